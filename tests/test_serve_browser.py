"""The dashboard end to end: real Apptainer runs, a real uvicorn on 127.0.0.1 and a real headless
Chromium (Debian's chromium + chromedriver, driven by Selenium with the driver path given, so
nothing is downloaded), all as the ordinary test user, with Chromium's sandbox on.

Each page is kept as a screenshot (test artifact: ``$HPCEXP_TEST_ARTIFACTS`` or pytest's temp
folder; docs/img/dashboard-*.png are these).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from conftest import REQUIRED
from servehelp import Server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
XSS = "<script>alert(1)</script>"

RUN_SH = r"""
echo hello
i=0
while [ "$i" -lt "${HPCEXP_PARAM_n:-10}" ]; do echo "tick $i"; i=$((i+1)); sleep "${HPCEXP_PARAM_s:-0.5}"; done
echo "note: $HPCEXP_PARAM_note" >&2
echo "$HPCEXP_RUN_ID" > "$HPCEXP_RESULTS/result.txt"
mkdir -p "$HPCEXP_RESULTS/plots"
printf 'x,y\n1,2\n' > "$HPCEXP_RESULTS/plots/data.csv"
exit "${HPCEXP_PARAM_code:-0}"
"""


def _need(path: str) -> None:
    if not os.access(path, os.X_OK):
        msg = f"{path} is missing (scripts/provision.d/10-browser.sh installs it)"
        pytest.fail(msg) if REQUIRED else pytest.skip(msg)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = os.environ.get("HPCEXP_TEST_ARTIFACTS")
    out = Path(where) if where else tmp_path_factory.mktemp("dashboard-screenshots")
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def project(busybox_sif: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dashproj")
    (root / "hpcexp.yaml").write_text(
        f'bases:\n  "busybox:latest": {{sif: {json.dumps(str(busybox_sif))}}}\n'
        "slurm: {time: '5', mem: 200M}\n"
        "experiments:\n"
        "  hello:\n    ref: https://example.org/paper\n    code: https://example.org/code\n"
        "    command: [/bin/sh, /app/run.sh]\n")
    exp = root / "experiments" / "hello"
    exp.mkdir(parents=True)
    (exp / "Dockerfile").write_text("FROM busybox:latest\nCOPY run.sh /app/run.sh\n")
    (exp / "run.sh").write_text(RUN_SH)
    return root


@pytest.fixture(scope="module")
def server(project: Path, tmp_path_factory: pytest.TempPathFactory):
    srv = Server(project, env={"XDG_CACHE_HOME": str(tmp_path_factory.mktemp("cache"))}, timeout=60)
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    _need(CHROMIUM)
    _need(CHROMEDRIVER)
    assert os.geteuid() != 0, "the browser runs as the ordinary user, with its sandbox"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path_factory.mktemp("downloads")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--disable-quic", "--disable-default-apps",
                "--disable-extensions", "--window-size=1360,900", "--force-device-scale-factor=1",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(arg)
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})
    os.environ.setdefault("SE_AVOID_STATS", "true")
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads  # type: ignore[attr-defined]
    try:
        yield driver
    finally:
        driver.quit()


def wait(pred: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        time.sleep(0.1)


def shot(driver: Any, artifacts: Path, name: str) -> None:
    path = artifacts / f"dashboard-{name}.png"
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000
    print(f"screenshot: {path}")


def no_alert(driver: Any) -> None:
    from selenium.common.exceptions import NoAlertPresentException

    try:
        alert = driver.switch_to.alert
    except NoAlertPresentException:
        return
    text = alert.text
    alert.dismiss()
    raise AssertionError(f"a script ran from user text: alert({text!r})")


def final_page(d: Any) -> bool:
    """The run page of an ended run, both logs complete (the page reloads itself when its run ends)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        return d.find_element(By.ID, "run-meta").get_attribute("data-terminal") == "1" and all(
            d.find_element(By.ID, f"log-{w}").get_attribute("data-ended") == "1" for w in ("stdout", "stderr"))
    except (NoSuchElementException, StaleElementReferenceException):
        return False


def test_open_run_watch_download(server: Server, browser: Any, project: Path, artifacts: Path) -> None:
    from selenium.webdriver.common.by import By

    d = browser
    d.get(server.url)
    # the token went into a cookie and out of the address bar
    assert "token=" not in d.current_url
    cookies = d.get_cookies()
    assert len(cookies) == 1 and cookies[0]["httpOnly"] and cookies[0]["sameSite"] == "Strict"
    row = d.find_element(By.CSS_SELECTOR, 'tr[data-experiment="hello"]')
    assert row.find_element(By.CSS_SELECTOR, "td.name").text == "hello"
    shot(d, artifacts, "experiments")

    # build from the page: the job page shows the build's progress, then succeeded
    row.find_element(By.CSS_SELECTOR, "button.build").click()
    wait(lambda: "/jobs/" in d.current_url, 30, "the job page")
    wait(lambda: d.find_element(By.ID, "job-state").text != "running", 180, "the build to finish")
    assert d.find_element(By.ID, "job-state").text == "succeeded", d.find_element(By.ID, "job-error").text
    assert d.find_element(By.ID, "job-lines").text.strip()
    shot(d, artifacts, "job")
    d.get(server.base + "/experiments")
    row = d.find_element(By.CSS_SELECTOR, 'tr[data-experiment="hello"]')
    assert "built" in row.text

    # start a run from the page, with a parameter that would be markup if not escaped
    row.find_element(By.TAG_NAME, "summary").click()
    form = row.find_element(By.CSS_SELECTOR, "form.run-form")
    form.find_element(By.NAME, "params").send_keys(f"n=12\ns=0.5\nnote={XSS}")
    form.find_element(By.CSS_SELECTOR, "button.run").click()
    wait(lambda: "/runs/" in d.current_url, 180, "the run page after the build and start")
    run_id = d.current_url.rsplit("/", 1)[1]
    pre = d.find_element(By.ID, "log-stdout")
    wait(lambda: "tick 1" in pre.text, 30, "the first log lines")
    first = pre.text
    rec = json.loads((project / "runs" / "hello" / run_id / "run.json").read_text())
    assert rec["state"] == "running", rec["state"]  # the lines came while it ran
    wait(lambda: "tick 4" in pre.text, 30, "more lines")
    assert pre.text.startswith(first.split("tick 1")[0])
    assert d.find_element(By.CSS_SELECTOR, '.live[data-for="stdout"]').text == "live"
    shot(d, artifacts, "run-live")
    assert f"note={XSS}" in d.find_element(By.CSS_SELECTOR, "#record").text  # shown as text
    no_alert(d)
    wait(lambda: final_page(d), 60, "the end of the run on the page")
    assert "succeeded" in d.find_element(By.ID, "state").text
    assert not d.find_elements(By.CSS_SELECTOR, "button.stop")
    pre = d.find_element(By.ID, "log-stdout")
    assert pre.text.splitlines() == ["hello", *[f"tick {i}" for i in range(12)]]
    assert f"note: {XSS}" in d.find_element(By.ID, "log-stderr").text
    no_alert(d)
    shot(d, artifacts, "run")

    # results browser, then a download of the whole run, verified
    d.find_element(By.LINK_TEXT, "Results").click()
    names = [a.text for a in d.find_elements(By.CSS_SELECTOR, "#files td:first-child")]
    assert names == ["plots/", "result.txt"], names
    shot(d, artifacts, "results")
    d.back()
    d.find_element(By.ID, "dl-tgz").click()
    got = wait(lambda: [p for p in d.downloads.iterdir() if p.name.endswith(".tar.gz")], 60, "the download")
    wait(lambda: not any(p.name.endswith(".crdownload") for p in d.downloads.iterdir()), 60, "download complete")
    from hpcexp import archive

    report = archive.verify_archive(got[0])
    assert report.ok, report.problems
    assert report.runs == [f"hello/{run_id}"] or any(run_id in r for r in report.runs), report.runs
    dest = d.downloads / "x"
    archive.extract_archive(got[0], dest)
    assert (dest.rglob("result.txt").__next__()).read_text().strip() == run_id



def test_a_foreign_page_cannot_use_the_dashboard(server: Server, browser: Any) -> None:
    """Without the cookie (a fresh origin name for the same server) every page is 401 and tells nothing."""
    d = browser
    d.get(f"http://localhost:{server.port}/runs")
    body = d.find_element("tag name", "body").text
    assert "401" in body and "hello" not in body


def test_stop_from_the_page(server: Server, browser: Any, project: Path, artifacts: Path) -> None:
    from selenium.webdriver.common.by import By

    d = browser
    d.get(server.url)
    row = d.find_element(By.CSS_SELECTOR, 'tr[data-experiment="hello"]')
    row.find_element(By.TAG_NAME, "summary").click()
    form = row.find_element(By.CSS_SELECTOR, "form.run-form")
    form.find_element(By.NAME, "params").send_keys("n=600\ns=0.2")
    form.find_element(By.CSS_SELECTOR, "button.run").click()
    wait(lambda: "/runs/" in d.current_url, 120, "the run page")
    run_id = d.current_url.rsplit("/", 1)[1]
    wait(lambda: "tick 2" in d.find_element(By.ID, "log-stdout").text, 30, "log lines")
    d.find_element(By.CSS_SELECTOR, "button.stop").click()
    wait(lambda: json.loads((project / "runs" / "hello" / run_id / "run.json").read_text())["state"] == "cancelled",
         60, "the run cancelled")
    d.get(server.base + f"/runs/{run_id}")
    wait(lambda: final_page(d), 30, "log end")
    assert "cancelled" in d.find_element(By.ID, "state").text

    # one that fails, then the runs table shows each state in its colour
    d.get(server.base + "/experiments")
    row = d.find_element(By.CSS_SELECTOR, 'tr[data-experiment="hello"]')
    row.find_element(By.TAG_NAME, "summary").click()
    form = row.find_element(By.CSS_SELECTOR, "form.run-form")
    form.find_element(By.NAME, "params").send_keys("n=1\ns=0\ncode=3")
    form.find_element(By.CSS_SELECTOR, "button.run").click()
    wait(lambda: "/runs/" in d.current_url, 120, "the run page")
    wait(lambda: final_page(d), 60, "the run's end")
    assert "failed" in d.find_element(By.ID, "state").text
    d.get(server.base + "/runs")
    table = d.find_element(By.ID, "runs")
    states = [e.text for e in table.find_elements(By.CSS_SELECTOR, ".state")]
    assert sorted(states) == ["cancelled", "failed", "succeeded"], states
    colours = {e.text: e.value_of_css_property("background-color") for e in table.find_elements(By.CSS_SELECTOR,
                                                                                                   ".state")}
    assert len(set(colours.values())) == 3, colours
    no_alert(d)
    shot(d, artifacts, "runs")
    d.get(server.base + "/runs?state=failed")
    assert [e.text for e in d.find_elements(By.CSS_SELECTOR, "#runs .state")] == ["failed"]
    d.get(server.base + "/images")
    assert "hello" in d.find_element(By.ID, "images").text
    shot(d, artifacts, "images")


@pytest.mark.slurm
def test_submit_a_sweep_from_the_page(server: Server, browser: Any, artifacts: Path) -> None:
    """Submit with a sweep: one job array through the real Slurm; the sweep's page shows its summary."""
    from selenium.webdriver.common.by import By

    d = browser
    d.get(server.base + "/experiments")
    row = d.find_element(By.CSS_SELECTOR, 'tr[data-experiment="hello"]')
    row.find_element(By.TAG_NAME, "summary").click()
    form = row.find_element(By.CSS_SELECTOR, "form.submit-form")
    form.find_element(By.NAME, "params").send_keys("s=0")
    form.find_element(By.NAME, "sweeps").send_keys("n=1,2\ncode=0,4")
    form.find_element(By.CSS_SELECTOR, "button.submit").click()
    wait(lambda: "/jobs/" in d.current_url, 30, "the job page")
    wait(lambda: d.find_element(By.ID, "job-state").text != "running", 120, "the submission")
    assert d.find_element(By.ID, "job-state").text == "succeeded", d.find_element(By.ID, "job-error").text
    run_ids = [a.text for a in d.find_elements(By.CSS_SELECTOR, "#job-runs a")]
    assert len(run_ids) == 4
    sweep = server.json(f"/api/runs/{run_ids[0]}")[0]["sweep_id"]
    assert sweep and all(r["sweep_id"] == sweep for r in server.json(f"/api/runs/{sweep}"))

    def settled() -> bool:
        return all(r["state"] in ("succeeded", "failed") for r in server.json(f"/api/runs/{sweep}"))

    wait(settled, 240, "the sweep's tasks to end")
    d.get(server.base + f"/runs/{sweep}")  # a sweep id opens the sweep's page
    assert "sweep=" in d.current_url
    assert d.find_element(By.ID, "sweep-summary").text.startswith(f"sweep {sweep}: 2 succeeded, 2 failed")
    assert len(d.find_elements(By.CSS_SELECTOR, "#runs tbody tr")) == 4
    shot(d, artifacts, "sweep")
    status, _, body = server.request("GET", f"/runs/{sweep}/archive.zip")
    assert status == 200
    import tempfile

    from hpcexp import archive

    with tempfile.NamedTemporaryFile(suffix=".zip") as fh:
        fh.write(body)
        fh.flush()
        report = archive.verify_archive(fh.name)
    assert report.ok and len(report.runs) == 4


def test_screenshots_kept(artifacts: Path) -> None:
    names = sorted(p.name for p in artifacts.glob("dashboard-*.png"))
    for n in ("experiments", "job", "run-live", "run", "results", "runs", "images"):
        assert f"dashboard-{n}.png" in names, names
    if os.environ.get("HPCEXP_DOCS_IMG"):
        for p in artifacts.glob("dashboard-*.png"):
            shutil.copy(p, Path(os.environ["HPCEXP_DOCS_IMG"]) / p.name)
    assert subprocess.run(["true"]).returncode == 0
