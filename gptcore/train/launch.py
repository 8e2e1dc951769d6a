"""Pretraining in this process, or across this machine's GPUs under `torchrun`.

The pipeline calls `pretrain_stage`. With `pretrain.nproc_per_node` above 1 it writes the
config next to the run, starts `torchrun --nproc_per_node N -m gptcore.cli pretrain ...`,
streams every rank's output into the log, and fails when any rank fails (torchrun's exit
code). Across machines, start the same torchrun command on each node with `--nnodes` and a
rendezvous endpoint: gptcore adds no launcher of its own.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections import deque
from dataclasses import asdict
from pathlib import Path

import yaml

from gptcore.config import PipelineConfig
from gptcore.errors import GptcoreError
from gptcore.fsutil import atomic_file
from gptcore.layout import Workdir
from gptcore.results import PretrainResult, load_pretrained
from gptcore.tracking import Tracking
from gptcore.train.pretrain import pretrain

log = logging.getLogger("gptcore.launch")


def write_yaml(path: Path, data: dict) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def torchrun_command(cfg: PipelineConfig, workdir: Path, tracking: Tracking | None, resume: bool) -> list[str]:
    """The torchrun command line; the config and MLflow settings travel as files beside the run."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={cfg.pretrain.nproc_per_node}",
        "-m",
        "gptcore.cli",
        "pretrain",
        "--workdir",
        str(workdir),
        "--config",
        str(write_yaml(workdir / "pretrain.launch.yaml", cfg.to_dict())),
    ]
    if tracking is None:
        cmd.append("--no-tracking")
    else:
        cmd += ["--mlflow-config", str(write_yaml(workdir / "pretrain.mlflow.yaml", asdict(tracking.settings)))]
        if tracking.parent_run_id:
            cmd += ["--parent-run-id", tracking.parent_run_id]
    return cmd + (["--resume"] if resume else [])


def pretrain_stage(
    cfg: PipelineConfig, workdir: str | Path, tracking: Tracking | None = None, resume: bool = False
) -> PretrainResult:
    """Pretrain per `cfg` into the work directory's standard place; torchrun when it asks for several processes."""
    w = Workdir(workdir)
    nproc = cfg.pretrain.nproc_per_node
    if nproc == 1:
        return pretrain(cfg.model, cfg.pretrain, w.tokenizer, w.pretrain, tracking, resume=resume)
    w.root.mkdir(parents=True, exist_ok=True)
    cmd = torchrun_command(cfg, w.root, tracking, resume)
    log.info("pretrain: launching %s", " ".join(cmd))
    tail: deque[str] = deque(maxlen=15)
    errors: list[str] = []  # a rank's own one-line error, which torchrun's report would push out of the tail
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            line = line.rstrip()
            tail.append(line)
            if line.startswith("gptcore pretrain: error:") and len(errors) < 5:
                errors.append(line)
            log.info("torchrun: %s", line)
    if proc.returncode != 0:
        raise GptcoreError(
            f"pretrain: torchrun with {nproc} processes exited with code {proc.returncode}\n"
            + "\n".join(errors or tail)
        )
    return load_pretrained(w.pretrain)
