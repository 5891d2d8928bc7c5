"""``remoterun ui``: the command as a subprocess, its token and read-only guard over
HTTP, and its pages in a real headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by selenium; skipped when they are absent).
(The README's screenshots are made by ``scripts/ui_screenshots.py``.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import remote_tasks as tasks
from conftest import client_env, make_cluster

import remoterun as rr
from remoterun.agent.record import RunRecord
from remoterun.ui.browse import Browser

COMMAND = str(Path(sys.executable).parent / "remoterun")
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT = 30


class UiServer:
    """``remoterun ui`` as a subprocess; its link parsed from what it prints."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen(
            [COMMAND, "ui", "--no-browser", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=client_env(),
            start_new_session=True,
        )
        line = self.proc.stdout.readline()
        found = re.search(r"(http://127\.0\.0\.1:(\d+))/\?token=(\S+)", line)
        if not found:
            self.stop()
            raise AssertionError(f"no link printed: {line!r} {self.proc.stderr.read()!r}")
        self.base, self.port, self.token = found.group(1), int(found.group(2)), found.group(3)
        self.url = f"{self.base}/?token={self.token}"

    def get(self, path: str, token: str | None = "", headers: dict | None = None):
        """(status, body) of a GET; ``token`` "" sends the right one, None none."""
        sep = "&" if "?" in path else "?"
        if token == "":
            token = self.token
        url = self.base + path + (f"{sep}token={token}" if token is not None else "")
        return _fetch(urllib.request.Request(url, headers=headers or {}))

    def post(self, path: str, body: dict, token: str | None = ""):
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["X-Remoterun-Token"] = token or self.token
        data = json.dumps(body).encode()
        return _fetch(urllib.request.Request(self.base + path, data=data, headers=headers))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()


def _fetch(request: urllib.request.Request) -> tuple[int, dict | str]:
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            status, text = reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


@pytest.fixture
def ui():
    """Start ``remoterun ui`` with the given arguments; every one is stopped after."""
    started: list[UiServer] = []

    def start(*args: str) -> UiServer:
        server = UiServer(*args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def chromium():
    """A headless Chromium that reaches nothing but 127.0.0.1, with a fresh profile."""
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip("no chromium and chromium-driver (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="rr-ui-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium-manager downloads nothing
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT, poll_frequency=0.1).until(
        lambda d: condition(d), message=f"timed out waiting for {what}"
    )


def text_of(driver, css: str) -> str:
    """The rendered text of the first element ``css`` ("" if none), read in one script:
    the page redraws parts of itself, which would make a found element stale."""
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.innerText.trim() : '';",
        css,
    )


def mark_page(driver) -> None:
    """A mark that a reload would wipe out."""
    driver.execute_script("window.rrNoReload = 'kept';")


def assert_not_reloaded(driver) -> None:
    assert driver.execute_script("return window.rrNoReload") == "kept"


# ------------------------------------------------------------------ token and guard


def test_requests_without_the_token_get_403(ui):
    rr.function(tasks.add)(1, run_name="guarded")
    server = ui()
    for path in ("/", "/api/runs", "/api/run?source=0&name=guarded", "/static/app.js"):
        assert server.get(path, token=None)[0] == 403, path
        assert server.get(path, token="not-the-token")[0] == 403, path
        assert server.get(path)[0] in (200,), path
    status, body = server.get("/api/runs")
    assert [run["name"] for run in body["runs"]] == ["guarded"]
    # the token in a cookie, as the first visit sets it, is accepted as well
    cookie = {"Cookie": f"remoterun-ui-{server.port}={server.token}"}
    assert server.get("/api/runs", token=None, headers=cookie)[0] == 200
    wrong_cookie = {"Cookie": f"remoterun-ui-{server.port}=guess"}
    assert server.get("/api/runs", token=None, headers=wrong_cookie)[0] == 403
    # a page that renamed another site to 127.0.0.1 sends its own Host: refused
    assert server.get("/api/runs", headers={"Host": "evil.example:80"})[0] == 403


def listening_addresses(port: int) -> list[str]:
    """The addresses listening on ``port`` (IPv4 and IPv6), from /proc/net."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.rsplit(":", 1)
            if state == "0A" and int(port_hex, 16) == port:
                found.append(address)
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux's /proc/net")
def test_it_listens_on_127_0_0_1_only(ui):
    server = ui()
    assert listening_addresses(server.port) == ["0100007F"]  # 127.0.0.1, and nothing else


def test_the_first_visit_sets_a_private_cookie(ui):
    server = ui()
    with urllib.request.urlopen(server.url, timeout=30) as reply:
        cookie = reply.headers["Set-Cookie"]
        page = reply.read().decode()
    assert cookie.startswith(f"remoterun-ui-{server.port}={server.token};")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "remoterun" in page and "/static/app.js" in page


def test_actions_are_refused_read_only_and_need_confirmation(ui, scratch):
    flag = scratch / "go"
    going = rr.function(tasks.wait_for_file).run(str(flag), 60, run_name="going")
    read_only = ui()
    ask = {"action": "cancel", "source": "0", "name": "going", "confirm": "going"}
    status, body = read_only.post("/api/action", ask)
    assert status == 403 and "read-only" in body["error"]
    assert read_only.post("/api/action", ask, token=None)[0] == 403
    assert going.refresh().status is rr.RunStatus.RUNNING

    allowed = ui("--allow-actions")
    unconfirmed = dict(ask, confirm=None)
    status, body = allowed.post("/api/action", unconfirmed)
    assert status == 403 and "not confirmed" in body["error"]
    assert allowed.post("/api/action", ask, token=None)[0] == 403  # no header token
    assert going.refresh().status is rr.RunStatus.RUNNING
    status, body = allowed.post("/api/action", ask)
    assert status == 200 and body["status"] == "CANCELLED"
    assert going.refresh().status is rr.RunStatus.CANCELLED


def test_a_rerun_action_starts_a_new_run_of_the_recorded_call(ui):
    rr.function(tasks.add)(2, 3, run_name="source-run")
    allowed = ui("--allow-actions")
    ask = {"action": "rerun", "source": "0", "name": "source-run", "confirm": "source-run"}
    status, body = allowed.post("/api/action", ask)
    assert status == 200, body
    assert rr.local().get_run(body["name"]).result(timeout=30) == 5


def test_runs_of_an_s3_store(ui, s3):
    rr.function(tasks.wait_for_file).run("/nonexistent", 0.1, run_name="to-s3").wait()
    rr.local().get_run("to-s3").to(f"{s3}/runs")
    server = ui(f"{s3}/runs")
    status, body = server.get("/api/runs")
    assert status == 200, body
    assert [(r["name"], r["status"]) for r in body["runs"]] == [("to-s3", "FAILED")]
    status, log = server.get("/api/log?source=0&name=to-s3&stream=stdout&offset=0")
    assert status == 200 and log["text"] == "started\n" and log["terminal"]
    status, run = server.get("/api/run?source=0&name=to-s3")
    assert "TimeoutError" in run["error"] and "wait_for_file" in run["traceback"]


def test_a_store_that_fails_is_told_and_the_others_are_listed(ui, s3):
    rr.function(tasks.add)(1, run_name="still-here")
    server = ui("here", "s3://rr-no-such-bucket/runs")
    status, body = server.get("/api/runs")
    assert status == 200
    assert [r["name"] for r in body["runs"]] == ["still-here"]
    assert len(body["problems"]) == 1 and "no bucket 'rr-no-such-bucket'" in body["problems"][0]


def test_runs_of_a_saved_cluster(ui, ssh_server):
    cluster = make_cluster(ssh_server, name="ui-box")
    rr.function(tasks.wait_for_file, system=cluster).run(
        "/nonexistent", 0.1, run_name="remote-log"
    ).wait()
    cluster.save()
    cluster.close()
    server = ui("ui-box")
    status, body = server.get("/api/runs")
    assert status == 200, body
    assert [r["name"] for r in body["runs"]] == ["remote-log"]
    status, log = server.get("/api/log?source=0&name=remote-log&stream=stdout&offset=0")
    assert log["text"] == "started\n"


def test_the_web_server_loads_only_for_the_ui_command():
    code = "import remoterun, remoterun.cli, sys; print(sorted(sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = {name.strip("' ") for name in done.stdout.strip("[]\n").split(",")}
    web = {"starlette", "uvicorn", "remoterun.ui", "selenium"}
    assert "remoterun.cli" in loaded and "click" in loaded
    assert not web & loaded


def test_an_unknown_system_is_a_usage_error():
    done = subprocess.run(
        [COMMAND, "ui", "--no-browser", "no-such-cluster"],
        capture_output=True,
        text=True,
        env=client_env(),
        timeout=60,
    )
    assert done.returncode == 2 and "no system named 'no-such-cluster'" in done.stderr


# ------------------------------------------------------------------ paging


def plant_runs(root: Path, count: int) -> None:
    """``count`` finished runs' records, written as a worker writes them."""
    system = rr.LocalSystem(root=str(root))
    for i in range(count):
        name = f"run-{i:05d}"
        record = RunRecord.new(name, "function", 1, fn_name="step").running(host="h")
        record["start_time"] = f"2026-01-01T00:{i // 60:02d}:{i % 60:02d}.000000Z"
        if i % 3:
            record.completed()
        else:
            record.failed("no", "builtins.ValueError")
        folder = system.folder(name)
        folder.files.mkdir(folder.path)
        folder.write_record(record)


def test_a_large_store_answers_its_first_page_from_a_few_records(tmp_path):
    plant_runs(tmp_path / "runs", 300)
    browser = Browser([("big", rr.LocalSystem(root=str(tmp_path / "runs")))])
    source = browser.sources[0]
    source.filling = True  # hold the background reader back: the page reads alone
    first = browser.runs(limit=20, sort="name", desc=False)
    assert first["total"] == 300 and len(first["runs"]) == 20
    assert first["known"] < 300 and not first["complete"]
    assert [r["name"] for r in first["runs"]] == [f"run-{i:05d}" for i in range(20)]
    source.filling = False
    browser._fill_in_background(source)
    for _ in range(300):  # the rest are read in the background
        if browser.runs(limit=1)["complete"]:
            break
        time.sleep(0.1)
    newest = browser.runs(limit=5, sort="start", desc=True)
    assert newest["complete"]
    assert [r["name"] for r in newest["runs"]] == [f"run-{i:05d}" for i in range(299, 294, -1)]
    failed = browser.runs(limit=500, status="failed")
    assert failed["matching"] == 100
    assert {r["status"] for r in failed["runs"]} == {"FAILED"}
    found = browser.runs(query="run-0004")
    assert sorted(r["name"] for r in found["runs"]) == [f"run-{i:05d}" for i in range(40, 50)]
    browser.close()


def test_inputs_are_summarised_without_unpickling(tmp_path):
    import numpy as np

    system = rr.LocalSystem(root=str(tmp_path / "runs"))
    rr.function(tasks.identity, system=system)(np.arange(3), run_name="arr")
    detail = Browser([("here", system)]).run("0", "arr")
    inputs = detail["inputs"]
    assert inputs["present"] and inputs["digest"] == "matches the record"
    assert any("numpy" in name for name in inputs["classes"])


# ------------------------------------------------------------------ in a browser


def row_names(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, "#runs-table tbody tr")
    try:
        return [r.get_attribute("data-name") for r in rows]
    except Exception:  # a row replaced as it was read: ask again
        return []


def test_runs_page_shows_runs_and_a_status_change_without_reload(ui, scratch, chromium):
    from selenium.webdriver.common.by import By

    rr.function(tasks.add)(1, run_name="done-one")
    flag = scratch / "go"
    rr.function(tasks.wait_for_file).run(str(flag), 60, run_name="waiting-one")
    server = ui()
    chromium.get(server.url)
    row = 'tr[data-name="waiting-one"] .status'
    wait_for(chromium, lambda d: text_of(d, row) == "RUNNING", "the RUNNING row")
    assert text_of(chromium, 'tr[data-name="done-one"] .status') == "COMPLETED"
    mark_page(chromium)
    flag.write_text("go")
    wait_for(chromium, lambda d: text_of(d, row) == "COMPLETED", "the status to change")
    assert_not_reloaded(chromium)
    chromium.find_element(By.ID, "filter").send_keys("done")
    wait_for(chromium, lambda d: row_names(d) == ["done-one"], "the filter")
    chromium.find_element(By.ID, "filter").clear()
    chromium.find_element(By.ID, "filter").send_keys("-one")
    chromium.find_element(By.CSS_SELECTOR, 'th[data-sort="name"]').click()
    wait_for(chromium, lambda d: row_names(d) == ["done-one", "waiting-one"], "name order")
    chromium.find_element(By.CSS_SELECTOR, 'th[data-sort="name"]').click()
    wait_for(chromium, lambda d: row_names(d) == ["waiting-one", "done-one"], "reversed")


def test_run_page_follows_the_log_and_shows_the_end(ui, scratch, chromium):
    from selenium.webdriver.common.by import By

    flag = scratch / "go"
    rr.function(tasks.wait_for_file).run(str(flag), 60, run_name="followed")
    server = ui()
    chromium.get(server.url + "#/run/0/followed")
    wait_for(chromium, lambda d: "started" in text_of(d, "#log-stdout"), "the first line")
    assert "saw the file" not in text_of(chromium, "#log-stdout")
    assert "RUNNING" in text_of(chromium, "h1")
    mark_page(chromium)
    flag.write_text("go")
    wait_for(chromium, lambda d: "saw the file" in text_of(d, "#log-stdout"), "the new line")
    wait_for(chromium, lambda d: "COMPLETED" in text_of(d, "h1"), "the end")
    assert text_of(chromium, "#log-stdout") == "started\nsaw the file"
    assert_not_reloaded(chromium)
    assert "wait_for_file" in text_of(chromium, "#record")
    assert "null" not in text_of(chromium, "#main")  # absent parts are left out
    assert not chromium.find_elements(By.CSS_SELECTOR, "button[data-action]")  # read-only


def test_run_page_shows_the_remote_traceback(ui, chromium):
    with pytest.raises(tasks.CustomError):
        rr.function(tasks.fail)("it broke", run_name="broken")
    server = ui()
    chromium.get(server.url + "#/run/0/broken")
    wait_for(chromium, lambda d: "it broke" in text_of(d, "#run-error"), "the error")
    assert "raise CustomError(message)" in text_of(chromium, "#traceback")
    assert "FAILED" in text_of(chromium, "h1")


def test_metrics_page_overlays_runs_in_one_plot(ui, chromium):
    from selenium.webdriver.common.by import By

    for name in ("metrics-a", "metrics-b"):
        rr.function(tasks.log_some_metrics)(run_name=name)
    server = ui()
    chromium.get(server.url + "#/metrics?runs=0:metrics-a,0:metrics-b")
    wait_for(
        chromium,
        lambda d: d.find_elements(By.CSS_SELECTOR, '.plot[data-metric="loss"] canvas'),
        "the plot",
    )
    legend = text_of(chromium, '.plot[data-metric="loss"] .u-legend')
    assert "metrics-a" in legend and "metrics-b" in legend
    drawn = chromium.execute_script(
        "const c = document.querySelector('.plot[data-metric=\"loss\"] canvas');"
        "const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 3; i < px.length; i += 4) if (px[i]) n++; return n;"
    )
    assert drawn > 100  # lines were painted on the canvas
    assert "0.9" in text_of(chromium, "#single-values")  # the single-value metric


def test_lineage_page_draws_the_graph_and_a_click_opens_a_run(ui, chromium):
    from selenium.webdriver.common.by import By

    with rr.run(name="pipeline"):
        rr.function(tasks.add).get_or_run(3, run_name="step-ok").wait()
        try:
            rr.function(tasks.fail)("bad step", run_name="step-bad")
        except tasks.CustomError:
            pass
    server = ui()
    chromium.get(server.url + "#/lineage/0/pipeline")
    nodes = wait_for(
        chromium, lambda d: d.find_elements(By.CSS_SELECTOR, "svg#lineage g.node"), "the graph"
    )
    by_name = {n.get_attribute("data-name"): n for n in nodes}
    assert set(by_name) == {"pipeline", "step-ok", "step-bad"}
    assert by_name["step-bad"].get_attribute("data-status") == "FAILED"
    stroke = chromium.execute_script(
        "return document.querySelector('g.node[data-name=\"step-bad\"] rect')"
        ".getAttribute('stroke')"
    )
    assert stroke == "#c62828"  # failed steps in red
    assert len(chromium.find_elements(By.CSS_SELECTOR, "svg#lineage path.edge")) == 2
    by_name["step-ok"].click()
    wait_for(chromium, lambda d: d.current_url.endswith("#/run/0/step-ok"), "the run page")
    wait_for(chromium, lambda d: "step-ok" in text_of(d, "h1"), "the run's name")


def click_when_there(driver, css: str) -> None:
    """Click the element ``css`` (the page redraws parts of itself every second)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    def clicked(d) -> bool:
        try:
            found = d.find_elements(By.CSS_SELECTOR, css)
            if found:
                found[0].click()
                return True
        except StaleElementReferenceException:
            pass
        return False

    wait_for(driver, clicked, css)


def test_an_action_asks_first_and_is_done_only_once_confirmed(ui, scratch, chromium):
    from selenium.webdriver.support import expected_conditions

    going = rr.function(tasks.wait_for_file).run(str(scratch / "go"), 60, run_name="to-cancel")
    server = ui("--allow-actions")
    chromium.get(server.url + "#/run/0/to-cancel")
    button = 'button[data-action="cancel"]'
    click_when_there(chromium, button)
    dialog = wait_for(chromium, expected_conditions.alert_is_present(), "the question")
    assert dialog.text == "cancel run to-cancel?"
    dialog.dismiss()
    assert going.refresh().status is rr.RunStatus.RUNNING
    click_when_there(chromium, button)
    wait_for(chromium, expected_conditions.alert_is_present(), "the question").accept()
    done = wait_for(chromium, expected_conditions.alert_is_present(), "the answer")
    assert "CANCELLED" in done.text
    done.accept()
    wait_for(chromium, lambda d: "CANCELLED" in text_of(d, "h1"), "the new status")
    assert going.refresh().status is rr.RunStatus.CANCELLED
