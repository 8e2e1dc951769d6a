"""Every CUDA path, verified and measured in one prepared run of a few minutes.

    bash bench/gpu_suite.sh --out DIR             a CUDA machine: at most --budget seconds (480)
    bash bench/gpu_suite.sh --out DIR --dry-run   any machine: the same steps, toy sizes, on the CPU

Steps, in order, each a subprocess with a timeout of its own, so that one hang costs its step and
not the suite (the suite's budget caps them all):
  1. gpu-tests  `pytest -m gpu tests/gpu`: bf16, fused AdamW, compile, NCCL/DDP, the CUDA provider's
                variants, parity, the cache on the device, engine and chat (skipped, with the
                reason, without CUDA: the dry run checks that they skip cleanly)
  2. pretrain   bench/pretrain.py --preset gpt2-124m: tokens/s, MFU on the device's bf16 peak,
                peak memory, after the compile warm-up
  3. pipeline   `gptcore pipeline --preset gpu`, pretraining cut to 60 s: the whole flow on the GPU
  4. inference  bench/inference.py: torch against ONNX Runtime fp32/fp16/int8, batch 1 and 16,
                on the pipeline's model and on the gpt2-124m shape
  5. serving    bench/serve_load.py on the pipeline's LM: the engine against the per-request path
Inference and serving run after the pipeline because they measure its model (and gpt2-124m's
package borrows its tokenizer).

Prints the step it is in and each step's figures as they come; writes DIR/suite.json (the machine,
and per step its command, status, seconds and the figures its bench wrote) and DIR/<step>.log.
Exit status 0 when every step passed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from machine import write_json  # bench/machine.py: the machine beside the figures


class StepTimeout(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    argv: list[str]
    timeout_s: float
    figures: str | None = None  # the JSON file (under the output directory) the step writes


def pipeline_overrides(dry_run: bool) -> dict[str, Any]:
    """The short pipeline: 60 s of pretraining on a GPU; on the CPU, a few steps of every stage."""
    if not dry_run:
        return {"pretrain": {"time_budget_s": 60.0}, "finetune": {"max_steps": 300}, "sft": {"max_steps": 300}}
    steps = {"max_steps": 20, "eval_interval": 10, "checkpoint_interval": 20, "warmup_steps": 2, "log_interval": 10}
    return {
        "pretrain": steps,
        "finetune": steps,
        "sft": {**steps, "eval_conversations": 40},
        "evaluate": {"max_eval_tokens": 5000},
    }


def steps(out: Path, dry_run: bool) -> list[Step]:
    python, work = sys.executable, out / "work"
    device = "cpu" if dry_run else "cuda"
    pretrain = ["--preset", "tiny", "--steps", "3", "--warmup", "1"] if dry_run else ["--preset", "gpt2-124m"]
    models = ["default"] if dry_run else ["default", "gpt2-124m"]  # gpt2-124m's export takes minutes on a CPU
    load = ["--concurrency", "1", "4", "--requests", "8", "--duration", "10", "--max-tokens", "8", "16"]
    if not dry_run:
        load = ["--concurrency", "1", "16", "--requests", "48", "--duration", "20"]
    preset = "tiny" if dry_run else "gpu"
    return [
        Step(
            "gpu-tests",
            [
                python,
                "-m",
                "pytest",
                "-m",
                "gpu",
                "tests/gpu",
                "-q",
                "-rs",
                "-p",
                "no:cacheprovider",
                "--junitxml",
                str(out / "gpu-tests.xml"),
            ],
            600 if dry_run else 100,
        ),
        Step(
            "pretrain",
            [python, "bench/pretrain.py", *pretrain, "--device", device, "--json", str(out / "pretrain.json")],
            300 if dry_run else 100,
            "pretrain.json",
        ),
        Step(
            "pipeline",
            [
                python,
                "-m",
                "gptcore.cli",
                "pipeline",
                "--preset",
                preset,
                "--workdir",
                str(work),
                "--config",
                str(out / "pipeline.yaml"),
                "--fresh",
            ],
            900 if dry_run else 200,
        ),
        Step(
            "inference",
            [
                python,
                "bench/inference.py",
                "--workdir",
                str(work),
                "--models",
                *models,
                "--device",
                device,
                "--json",
                str(out / "inference.json"),
            ],
            600 if dry_run else 100,
            "inference.json",
        ),
        Step(
            "serving",
            [
                python,
                "bench/serve_load.py",
                "--model",
                str(work / "export" / "lm"),
                "--device",
                device,
                *load,
                "--json",
                str(out / "serving.json"),
            ],
            600 if dry_run else 80,
            "serving.json",
        ),
    ]


def run_step(step: Step, log: Path, timeout_s: float, env: dict[str, str]) -> tuple[str, float]:
    """Run one step, its output echoed and kept in `log`; its status and seconds. A step past its
    timeout is killed with every process it started (its own process group)."""
    start = time.monotonic()
    with open(log, "w", encoding="utf-8") as f:
        child = subprocess.Popen(
            step.argv,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )

        def timeout(*_):
            raise StepTimeout  # out of the blocking read: a process that left the group may hold the pipe

        signal.signal(signal.SIGALRM, timeout)
        signal.setitimer(signal.ITIMER_REAL, max(timeout_s, 1.0))
        try:
            for line in child.stdout:
                f.write(line)
                print(f"[{step.name}] {line}", end="", flush=True)
            status = "passed" if child.wait() == 0 else f"failed (exit {child.returncode})"
        except StepTimeout:
            status = "timed out"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            if child.poll() is None or status == "timed out":
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)  # the step and every process it started
                child.wait()
    return status, time.monotonic() - start


def figures(step: Step, out: Path) -> Any:
    """What the step measured: its bench's JSON, the gpu tests' counts, the pipeline's training."""
    if step.figures:
        path = out / step.figures
        return json.loads(path.read_text())["results"] if path.is_file() else None
    if step.name == "gpu-tests":
        import xml.etree.ElementTree as ET

        path = out / "gpu-tests.xml"
        if not path.is_file():
            return None
        suite = ET.parse(path).getroot().find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        reasons = sorted({s.get("message", "") for s in suite.iter("skipped")})
        return (
            counts
            | {"passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]}
            | {"skip_reasons": reasons}
        )
    if step.name == "pipeline":
        from gptcore.results import load_pretrained

        try:
            result = load_pretrained(out / "work" / "pretrain")
        except (OSError, ValueError) as e:  # no result: the step's status says why
            return {"pretrain_result": f"none ({e})"}
        return {
            "pretrain_steps": result.steps,
            "pretrain_tokens_per_s": round(result.tokens_seen / result.train_seconds, 1),
            "pretrain_best_val_loss": round(result.best_val_loss, 4),
            "num_params": result.num_params,
        }
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu-suite"), help="where the JSON, logs and work go")
    p.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU: checks the suite itself")
    p.add_argument("--budget", type=float, help="seconds for the whole suite (default: 480; dry run 3000)")
    p.add_argument("--only", nargs="+", metavar="STEP", help="run these steps alone (a rerun of failed ones)")
    args = p.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline.yaml").write_text(json.dumps(pipeline_overrides(args.dry_run), indent=2))  # JSON is YAML
    budget = args.budget or (3000.0 if args.dry_run else 480.0)
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is the CPU's, also on a machine with a GPU
    plan = [s for s in steps(out, args.dry_run) if not args.only or s.name in args.only]
    deadline, rows = time.monotonic() + budget, []
    for i, step in enumerate(plan, 1):
        left = deadline - time.monotonic()
        print(f"== step {i}/{len(plan)}: {step.name} (timeout {min(step.timeout_s, left):.0f} s)", flush=True)
        if left < 10:
            status, seconds = "skipped (the suite's budget is spent)", 0.0
        else:
            status, seconds = run_step(step, out / f"{step.name}.log", min(step.timeout_s, left), env)
        row = {"step": step.name, "status": status, "seconds": round(seconds, 1), "command": step.argv[1:]}
        row["figures"] = figures(step, out)
        rows.append(row)
        shown = row["figures"] if not isinstance(row["figures"], list) else f"{len(row['figures'])} rows, as printed"
        print(f"== {step.name}: {status} in {seconds:.0f} s; figures: {json.dumps(shown)}", flush=True)
    write_json(out / "suite.json", {"dry_run": args.dry_run, "budget_s": budget, "steps": rows})
    print("\nstep        status                 seconds")
    for r in rows:
        print(f"{r['step']:11} {r['status']:22} {r['seconds']:7.0f}")
    print(f"figures: {out / 'suite.json'}")
    return 0 if all(r["status"] == "passed" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
