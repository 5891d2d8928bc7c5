"""Make the README's screenshots of ``remoterun ui`` (docs/ui-*.png).

    .venv/bin/python scripts/ui_screenshots.py [--out docs]

Records a few demo runs in a fresh REMOTERUN_HOME (training runs with loss curves, one
that fails, one still going, a three-step pipeline), serves them with ``remoterun ui``
and photographs each page in headless Chromium (Debian's ``chromium`` and
``chromium-driver``, as the tests use them). Everything it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import remoterun as rr


def train(lr: float, steps: int = 40) -> float:
    run = rr.current_run()
    run.log_params({"lr": lr, "steps": steps})
    run.set_tag("model", "mlp")
    loss = 2.0
    for step in range(steps):
        loss = loss * (1 - lr) + 0.05 * lr * math.sin(step)
        if loss > 1e3 or lr > 1:
            raise ValueError(f"loss diverged at step {step} (lr={lr})")
        run.log_metric("loss", round(loss, 4), step=step)
        run.log_metric("accuracy", round(1 - loss / 2.2, 4), step=step)
        print(f"step {step:3d}  loss {loss:.4f}")
    run.log_metric("final_loss", loss, single_value=True)
    return loss


def follow_file(path: str, steps: int = 400) -> int:
    rr.current_run().set_tag("model", "cnn")
    for step in range(steps):
        print(f"epoch {step}: {100 * step / steps:.0f}% of the data seen", flush=True)
        if os.path.exists(path):
            return step
        time.sleep(0.25)
    return steps


def prepare(n: int) -> list[float]:
    print(f"preparing {n} points")
    return [i / n for i in range(n)]


def fit(points: list[float]) -> float:
    print(f"fitting {len(points)} points")
    return sum(points) / len(points)


def evaluate(model: float) -> float:
    print(f"evaluating model {model:.3f}")
    return 1 - abs(model - 0.5)


def record_demo(release: Path) -> None:
    for lr in (0.3, 0.1, 0.03):
        rr.function(train)(lr, run_name=f"train-lr{lr}")
    try:
        rr.function(train)(5.0, run_name="train-lr5")
    except ValueError:
        pass
    with rr.run(name="pipeline"):
        data = rr.function(prepare, cache=True).get_or_run(200)
        model = rr.function(fit, cache=True).get_or_run(data)
        rr.function(evaluate, cache=True).get_or_run(model).wait()
    rr.function(follow_file).run(str(release), run_name="cnn-long")
    time.sleep(2)  # a few lines of its log


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs"))
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="rr-ui-shots-"))
    os.environ["REMOTERUN_HOME"] = str(scratch / "home")
    os.environ.setdefault("SE_OFFLINE", "true")
    release = scratch / "release"
    record_demo(release)

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    command = str(Path(sys.executable).parent / "remoterun")
    server = subprocess.Popen(
        [command, "ui", "--no-browser"], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    driver = None
    try:
        found = re.search(r"http://127\.0\.0\.1:\d+/\?token=\S+", server.stdout.readline())
        assert found, "remoterun ui printed no link"
        url = found.group(0)
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for flag in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--window-size=1280,820",
            f"--user-data-dir={scratch / 'profile'}",
        ):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))

        def shoot(route: str, css: str, name: str) -> None:
            driver.get(url + route)
            WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, css))
            time.sleep(1.5)  # the next poll: live parts filled in
            driver.save_screenshot(str(out / f"ui-{name}.png"))
            print("wrote", out / f"ui-{name}.png")

        shoot("", "#runs-table tbody tr", "runs")
        shoot("#/run/0/cnn-long", "#log-stdout", "run")
        shoot(
            "#/metrics?runs=0:train-lr0.3,0:train-lr0.1,0:train-lr0.03", ".plot canvas", "metrics"
        )
        shoot("#/lineage/0/pipeline", "svg#lineage g.node", "lineage")
    finally:
        release.write_text("done")
        if driver is not None:
            driver.quit()
        server.send_signal(signal.SIGINT)
        server.wait(10)
        rr.local().get_run("cnn-long").wait(30)
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
