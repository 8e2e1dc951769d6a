"""Re-take the screenshots of what a person sees after a tiny pipeline run (docs/screenshots.md).

    .venv/bin/python scripts/screenshots.py OUT_DIR [--workdir DIR] [--reuse]

Starts a Prefect server and runs `gptcore pipeline --preset tiny` against it, starts `mlflow ui` on
the run's store, photographs five pages in headless Chromium, writes OUT_DIR/screenshots.json, and
stops every process it started.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

# The tools of the interpreter that runs this script: the venv's gptcore, prefect and mlflow.
BIN = Path(sys.executable).parent
SIZE = {"width": 1440, "height": 900}
EXPERIMENT, LM_MODEL = "gptcore", "gptcore-lm"  # gptcore/tracking.py DEFAULT_SETTINGS, RegistryConfig.lm_name
INSTALL_HELP = {
    "playwright": "Python Playwright is missing: .venv/bin/pip install -e '.[screenshots]' (or pip install playwright)",
    "chromium": "Chromium is missing: apt-get install -y chromium (Debian/Ubuntu), or set CHROMIUM=/path/to/chrome. "
    "The script drives that browser; `playwright install` is not needed.",
}


def find_chromium() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path or not Path(path).exists():
        sys.exit(INSTALL_HELP["chromium"])
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


class Processes:
    """Every process the script starts, each in a session of its own so that stopping it by its id
    (its process group) also stops the workers it forked (uvicorn, gunicorn)."""

    def __init__(self, logs: Path):
        self.logs, self.started = logs, []
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, cmd: list[str], env: dict, cwd: Path) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - the child writes to it until stopped
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        proc.log_path, proc.name = log.name, name
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            try:  # a worker that outlived its parent still sits in the group
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{proc.name} exited ({proc.returncode}) before {url} answered: see {proc.log_path}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    sys.exit(f"{url} did not answer in {timeout_s:.0f}s: see {proc.log_path}")


def clean_env(**extra: str) -> dict:
    """The environment without the caller's Prefect / MLflow settings: the pictures must show this
    script's servers, not a profile's or a tracking server's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "GPTCORE_MLFLOW"))}
    return env | extra


def latest_flow_run(api: str) -> dict | None:
    completed = {"state": {"type": {"any_": ["COMPLETED"]}}}
    body = {"flows": {"name": {"any_": ["gptcore-pipeline"]}}, "flow_runs": completed, "sort": "START_TIME_DESC"}
    runs = http_json(f"{api}/flow_runs/filter", body | {"limit": 1})
    return runs[0] if runs else None


def summary_artifact(api: str, flow_run_id: str) -> str:
    body = {"artifacts": {"key": {"any_": ["gptcore-pipeline-summary"]}}, "flow_runs": {"id": {"any_": [flow_run_id]}}}
    found = http_json(f"{api}/artifacts/filter", body | {"sort": "CREATED_DESC", "limit": 1})
    if not found:
        sys.exit(f"flow run {flow_run_id} has no gptcore-pipeline-summary artifact")
    return found[0]["id"]


def mlflow_targets(mlflow: str) -> tuple[str, str, str]:
    """The experiment id, the newest finished pretrain run's id, and the newest LM version."""
    api = f"{mlflow}/api/2.0/mlflow"
    name = urllib.parse.quote(EXPERIMENT)
    experiment = http_json(f"{api}/experiments/get-by-name?experiment_name={name}")["experiment"]["experiment_id"]
    pretrain = "attributes.run_name = 'pretrain' and attributes.status = 'FINISHED'"
    body = {"experiment_ids": [experiment], "filter": pretrain, "order_by": ["attributes.start_time DESC"]}
    runs = http_json(f"{api}/runs/search", body | {"max_results": 1}).get("runs")
    if not runs:
        sys.exit("MLflow has no finished pretrain run: did the pipeline track to this store?")
    query = urllib.parse.urlencode({"filter": f"name='{LM_MODEL}'"})
    versions = http_json(f"{api}/model-versions/search?{query}").get("model_versions", [])
    if not versions:
        sys.exit(f"MLflow's registry has no version of {LM_MODEL}")
    newest = max(int(v["version"]) for v in versions)
    return experiment, runs[0]["info"]["run_id"], str(newest)


def grow_to_content(page) -> None:
    """Make the viewport as tall as the content: MLflow and Prefect scroll inside a panel, not the
    document, so Playwright's full_page alone would still stop at 900 pixels."""
    hidden = page.evaluate(
        """() => Math.max(0, ...[...document.querySelectorAll('*')].map(el => {
            const y = getComputedStyle(el).overflowY;
            return (y === 'auto' || y === 'scroll') && el.clientHeight > 200 ? el.scrollHeight - el.clientHeight : 0;
        }))"""
    )
    if hidden > 0:
        page.set_viewport_size({"width": SIZE["width"], "height": min(SIZE["height"] + hidden, 8000)})
        page.wait_for_timeout(2000)  # charts re-lay out, and lazy ones draw once they come into view


def shoot(page, out: Path, name: str, url: str | None, ready: str, shows: str, full_page=True, before=None) -> dict:
    """Open `url` (None: stay on the page), do what a user would first (`before`), wait for `ready`
    (real content, not a spinner) and a calm network, and take the picture. A page whose content never
    comes is photographed all the same: what it shows then is the finding."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    if url is not None:
        page.goto(url, wait_until="domcontentloaded")
    if before is not None:
        before(page)
    try:
        page.wait_for_selector(ready, state="visible", timeout=60_000)
        found = True
    except PlaywrightTimeout:
        found = False
        print(f"  {name}: {ready!r} never showed; taking the picture anyway", file=sys.stderr)
    try:
        page.wait_for_load_state("networkidle", timeout=10_000)
    except PlaywrightTimeout:  # pages that poll (MLflow's trace metrics, Prefect's runs) never go idle
        pass
    page.wait_for_timeout(1500)  # charts and graphs animate in after their data arrives
    if full_page:
        grow_to_content(page)
    page.screenshot(path=str(out / name), full_page=full_page)
    page.set_viewport_size(SIZE)
    print(f"  {name}: {page.url}")
    return {"file": name, "url": page.url, "shows": shows, "content_showed": found}


def to_training_runs(page) -> None:
    """What a user who wants the runs table does on the landing page: dismiss the pop-up, switch the
    sidebar to "Model training" (MLflow keeps that choice in the browser), close the Assistant panel
    that takes a third of the width, and expand each pipeline run to see its stage runs."""
    got_it = page.locator("[data-component-id='mlflow.detect_issues.guidance.got_it']")
    if got_it.count():  # the "Detect Issues" pop-up greys the page out: nothing else takes a click first
        got_it.first.click()
    page.get_by_role("button", name="Model training", exact=True).click()
    page.wait_for_selector(".ag-row", state="visible", timeout=60_000)
    close = page.locator("[data-component-id='mlflow.assistant.chat_panel.close']")
    if close.count():
        close.first.click()
    # Only a parent run's Run Name cell has a button: the expander (each starts collapsed).
    for button in page.locator(".ag-cell[col-id*='Run Name'] button").all():
        button.click()
        page.wait_for_timeout(500)


def take_pictures(out: Path, mlflow: str, prefect: str, flow_run_id: str, artifact_id: str) -> list[dict]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sys.exit(INSTALL_HELP["playwright"])
    experiment, pretrain_run, version = mlflow_targets(mlflow)
    runs = f"{mlflow}/#/experiments/{experiment}"
    # Per site, in order, a first-time visitor's journey: (file, URL or None to stay on the page,
    # selector of the real content, what the user does first, full page, what it should show).
    journeys = [
        [
            ("mlflow-experiment.png", runs, ".ag-row, :text('No data available')", None, False,
             "the experiment's page as it first opens, untouched: it should show the runs table"),
            ("mlflow-experiment-expanded.png", None, ".ag-row", to_training_runs, True,
             "the runs table after 'Model training' and closing the Assistant, the pipeline run expanded"),
            ("mlflow-pretrain-charts.png", f"{runs}/runs/{pretrain_run}/model-metrics", "svg.main-svg", None, True,
             "the pretrain run's metric charts: loss curves, learning rate, throughput"),
            ("mlflow-pretrain-loss.png", f"{runs}/runs/{pretrain_run}/artifacts/charts/loss.png", "img", None, False,
             "the pretrain run's charts/loss.png: its train and validation losses in one chart"),
            ("mlflow-pretrain-system.png", f"{runs}/runs/{pretrain_run}/system-metrics", "svg.main-svg", None, True,
             "the pretrain run's system metrics: CPU, memory, disk, network while it trained"),
            ("mlflow-model-version.png", f"{mlflow}/#/models/{LM_MODEL}/versions/{version}", "text=Source Run",
             None, True, f"{LM_MODEL} version {version}: source run, aliases, description, tags"),
        ],
        [
            # Not full page: below the graph come the run's logs, thousands of pixels of them.
            ("prefect-flow-run.png", f"{prefect}/runs/flow-run/{flow_run_id}", "canvas", None, False,
             "the pipeline's flow run: its state and the graph of its stage tasks, with edges"),
            ("prefect-summary-artifact.png", f"{prefect}/artifacts/artifact/{artifact_id}", "table", None, True,
             "the gptcore-pipeline-summary artifact: the run's headline figures as a table"),
        ],
    ]  # fmt: skip
    listing = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=find_chromium())
        try:
            for journey in journeys:
                page = browser.new_context(viewport=SIZE).new_page()  # a fresh browser profile per site
                page.set_default_timeout(60_000)
                for name, url, ready, before, full_page, shows in journey:
                    listing.append(shoot(page, out, name, url, ready, shows, full_page, before))
        finally:
            browser.close()
    return listing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--workdir", type=Path, default=Path("screenshots-work"))
    parser.add_argument("--reuse", action="store_true", help="skip the pipeline when the workdir has a finished run")
    args = parser.parse_args()
    find_chromium()  # fail before minutes of pipeline, not after
    missing = [tool for tool in ("gptcore", "prefect", "mlflow") if not (BIN / tool).exists()]
    if missing:
        sys.exit(f"{', '.join(missing)} not beside {sys.executable}: run it with the venv's .venv/bin/python")
    try:
        import playwright  # noqa: F401
    except ImportError:
        sys.exit(INSTALL_HELP["playwright"])
    out, work = args.out_dir.resolve(), args.workdir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    procs = Processes(work / "screenshot-logs")
    try:
        # Prefect's database lives under the workdir (PREFECT_HOME), so --reuse finds the earlier run.
        # The server's UI takes its API address from PREFECT_API_URL too: without it, it calls :4200.
        port = free_port()
        prefect, api = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/api"
        prefect_env = clean_env(
            PREFECT_HOME=str(work / "prefect-home"), PREFECT_API_URL=api, PREFECT_SERVER_ANALYTICS_ENABLED="false"
        )
        server = procs.start(
            "prefect-server",
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            prefect_env,
            work,
        )
        wait_http(f"{api}/health", server)
        print(f"prefect server up at {prefect} ({time.monotonic() - started:.0f}s)")
        flow_run = latest_flow_run(api) if args.reuse else None
        if flow_run is None:
            # cwd is the workdir: no ./mlflow.yaml applies, so the run tracks to DIR/mlflow.db, the store
            # `mlflow ui` shows below.
            t0 = time.monotonic()
            cmd = [str(BIN / "gptcore"), "pipeline", "--preset", "tiny", "--workdir", str(work)]
            run = procs.start("pipeline", cmd, prefect_env, work)
            print(f"running the tiny pipeline (a few minutes; log: {run.log_path}) ...")
            if run.wait() != 0:
                sys.exit(f"the pipeline failed ({run.returncode}): see {run.log_path}")
            print(f"pipeline done in {time.monotonic() - t0:.0f}s")
            flow_run = latest_flow_run(api)
            if flow_run is None:
                sys.exit(f"the pipeline ended but Prefect has no completed gptcore-pipeline run: see {run.log_path}")
        else:
            print(f"reusing flow run {flow_run['name']} ({flow_run['id']})")
        artifact_id = summary_artifact(api, flow_run["id"])
        # The experiment's artifact location is an absolute path (DEFAULT_SETTINGS: DIR/mlartifacts), so
        # the UI reads artifacts from there: no --default-artifact-root needed. cwd is the workdir so
        # that `mlflow ui` creates nothing where the script was started.
        mport = free_port()
        mlflow = f"http://127.0.0.1:{mport}"
        store = f"sqlite:///{work}/mlflow.db"
        ui = procs.start(
            "mlflow-ui",
            [str(BIN / "mlflow"), "ui", "--backend-store-uri", store, "--host", "127.0.0.1", "--port", str(mport)],
            clean_env(),
            work,
        )
        wait_http(f"{mlflow}/health", ui)
        print(f"mlflow ui up at {mlflow}; taking pictures into {out}")
        listing = take_pictures(out, mlflow, prefect, flow_run["id"], artifact_id)
        (out / "screenshots.json").write_text(json.dumps(listing, indent=2) + "\n", encoding="utf-8")
        print(f"done in {time.monotonic() - started:.0f}s: {out / 'screenshots.json'}")
    finally:
        procs.stop_all()


if __name__ == "__main__":
    main()
