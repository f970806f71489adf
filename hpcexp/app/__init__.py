"""One function per use case; the CLI and the web server both call these."""
