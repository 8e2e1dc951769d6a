"""The GPU suite's runner (bench/gpu_suite.py): a step past its timeout is killed with everything
it started and reported as such; a failing step is reported by its exit status."""

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("gpu_suite", REPO / "bench" / "gpu_suite.py")
gpu_suite = sys.modules["gpu_suite"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_suite)


def test_a_step_past_its_timeout_is_killed_with_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen(['sleep', '300'])\n"  # holds the step's output pipe open too
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(300)\n"
    )
    step = gpu_suite.Step("hang", [sys.executable, "-c", script], timeout_s=3)
    start = time.monotonic()
    status, seconds = gpu_suite.run_step(step, tmp_path / "hang.log", step.timeout_s, {"PATH": "/usr/bin:/bin"})
    assert status == "timed out" and 3 <= seconds < 30 and time.monotonic() - start < 30
    assert "started" in (tmp_path / "hang.log").read_text()
    ps = subprocess.run(["ps", "-o", "stat=", "-p", pid_file.read_text()], capture_output=True, text=True)
    assert ps.stdout.strip() in ("", "Z")  # gone (or a zombie its killed parent left)


def test_a_failing_step_reports_its_exit_status(tmp_path):
    step = gpu_suite.Step("fails", [sys.executable, "-c", "raise SystemExit(3)"], timeout_s=30)
    status, _ = gpu_suite.run_step(step, tmp_path / "fails.log", step.timeout_s, {"PATH": "/usr/bin:/bin"})
    assert status == "failed (exit 3)"
