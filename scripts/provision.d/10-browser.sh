# A real headless browser for the dashboard's end-to-end tests (tests/test_serve_browser.py):
# Debian's chromium and its matching chromedriver, so Selenium never downloads a driver.
# The tests run it as the ordinary test user, with its sandbox, headless, against a server
# they start themselves on 127.0.0.1.
need_pkgs chromium chromium-driver fonts-dejavu-core
[ -x /usr/bin/chromium ] || die "chromium did not install (/usr/bin/chromium missing)"
[ -x /usr/bin/chromedriver ] || die "chromium-driver did not install (/usr/bin/chromedriver missing)"
log "browser: $(/usr/bin/chromium --version 2>/dev/null | head -1)"
