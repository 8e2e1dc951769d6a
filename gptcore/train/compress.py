"""Compress: smaller students of the pretrained LM, by structured pruning and recovery by distillation.

For each share of the teacher's parameters in `compress.fractions`, under OUT/p<percent>-<recipe>/:
    p50-pruned/      the student as pruned (`gptcore.train.prune`), untrained: what recovery starts from
    p50-distilled/   recovered: trained on the token files against the teacher's softened logits
                     (`gptcore.model.distillation_kl`) plus the LM loss, through the shared loop
    p50-scratch/     (with `compress.scratch`) the same shape from random weights, LM loss only, the
                     same steps and batches: what the teacher's weights and logits bought
Each is a pretrain-shaped directory (result.json, best/, checkpoints/): evaluation, export and
registration read it as they read pretraining's (`gptcore.results.load_pretrained`). Each
student's model.json carries its recipe (`compression`), which its package and its registered
version keep. OUT/result.json lists the students (`gptcore.results.load_compressed`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from gptcore.config import CompressConfig
from gptcore.fsutil import sha256_file, write_json
from gptcore.layout import BEST_DIR, RESULT_FILE
from gptcore.model import GPT, distillation_kl, sequence_nll
from gptcore.results import CompressResult, PretrainResult, Student, load_pretrained, load_tokenized, read_tokens
from gptcore.tracking import Tracking, stage_run
from gptcore.train.batches import TokenBatches, fixed_windows
from gptcore.train.distributed import setup
from gptcore.train.loop import fit, lm_loss
from gptcore.train.prune import measure_importance, prune, student_shape
from gptcore.weights import WEIGHTS_FILE, load_lm, save_weights, tied_aliases, without_aliases

log = logging.getLogger("gptcore.compress")


def distill_loss(teacher: GPT, cfg: CompressConfig):
    """The recovery's loss: kl_weight x KL(teacher || student) at the temperature + the rest x LM loss."""

    def loss(model, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = batch
        logits, lm = model(x, targets=y)
        with torch.no_grad():
            teacher_logits, _ = teacher(x)
        kl = distillation_kl(logits, teacher_logits, teacher.cfg.vocab_size, cfg.temperature).mean()
        return cfg.kl_weight * kl + (1 - cfg.kl_weight) * lm

    return loss


RECIPE_DIRS = {"prune": "pruned", "prune+distill": "distilled", "scratch": "scratch"}


class Students:
    """Makes the students of one teacher under `out_dir`: each described, trained (or not) and written."""

    def __init__(self, cfg: CompressConfig, pretrained_dir, tokenized_dir, out_dir, tracking, resume: bool):
        self.cfg, self.tracking, self.resume, self.out_dir = cfg, tracking, resume, Path(out_dir)
        self.tokens = load_tokenized(tokenized_dir)
        pretrained = load_pretrained(pretrained_dir)
        self.teacher, self.teacher_meta = load_lm(pretrained.best_dir)
        self.teacher_sha256 = sha256_file(Path(pretrained.best_dir) / WEIGHTS_FILE)
        self.dist = setup(cfg.device)
        self.teacher.to(self.dist.device)
        self.teacher_params = self.teacher.num_parameters()
        T = self.teacher.cfg.block_size
        self.val_windows = fixed_windows(read_tokens(self.tokens, "val"), T, cfg.eval_batches * cfg.batch_size)

    def val_loss(self, model: GPT) -> dict[str, float]:
        inputs, targets = self.val_windows[:, :-1], self.val_windows[:, 1:]
        return {"val_loss": float(sequence_nll(model, inputs, targets, self.cfg.batch_size).mean())}

    def make(self, student: GPT, recipe: str, fraction: float, details: dict[str, Any], loss_fn=None, train_cfg=None):
        """Write the student (trained by `loss_fn` under `train_cfg`, or as it is) and its result.json."""
        name = f"p{round(fraction * 100)}-{RECIPE_DIRS[recipe]}"
        directory = self.out_dir / name
        directory.mkdir(parents=True, exist_ok=True)
        recipe_meta = {
            "student": name,
            "recipe": recipe,
            "target_fraction": fraction,
            "param_fraction": round(student.num_parameters() / self.teacher_params, 4),
            "num_params": student.num_parameters(),
            "teacher_params": self.teacher_params,
            "teacher_weights_sha256": self.teacher_sha256,
            "prune": self.cfg.prune,
            **details,
        }
        meta = {**self.teacher_meta, "model": asdict(student.cfg), "compression": recipe_meta}
        if loss_fn is None:  # as pruned: its weights are the best it has
            student.to(self.dist.device).eval()
            best, steps, seconds, tokens_seen = self.val_loss(student)["val_loss"], 0, 0.0, 0
            save_weights(without_aliases(student.state_dict(), tied_aliases(student)), directory / BEST_DIR, meta)
        else:
            tags = {"gptcore.data_digest": self.tokens.data_digest, "gptcore.compression": recipe}
            with stage_run(self.tracking, f"compress_{name}", tags=tags, system_metrics=True) as run:
                run.log_params({"compression": recipe_meta, "train": asdict(train_cfg)})
                batches = TokenBatches(
                    read_tokens(self.tokens, "train"),
                    train_cfg.batch_size,
                    student.cfg.block_size,
                    train_cfg.seed,
                    grad_accum_steps=train_cfg.grad_accum_steps,
                    pin=self.dist.device.type == "cuda",
                )
                fitted = fit(
                    f"compress-{name}",
                    student,
                    train_cfg,
                    batches,
                    loss_fn,
                    self.val_loss,
                    out_dir=directory,
                    meta=meta,
                    run=run,
                    select=("val_loss", "min"),
                    dist=self.dist,
                    resume=self.resume,
                    flops_per_token=student.flops_per_token(),
                )
            best, steps = fitted.best_metrics["val_loss"], fitted.steps
            seconds, tokens_seen = fitted.train_seconds, fitted.tokens_seen
        record = PretrainResult(
            out_dir=str(directory),
            best_dir=str(directory / BEST_DIR),
            model=asdict(student.cfg),
            num_params=student.num_parameters(),
            steps=steps,
            best_val_loss=best,
            tokens_seen=tokens_seen,
            train_seconds=seconds,
            data_digest=self.teacher_meta["data_digest"],
            tokenizer_digest=self.teacher_meta["tokenizer_digest"],
        )
        write_json(directory / RESULT_FILE, asdict(record))
        log.info(
            "compress: %s: %.2fM parameters (%.0f%% of the teacher), val loss %.4f after %d steps",
            name,
            student.num_parameters() / 1e6,
            100 * recipe_meta["param_fraction"],
            best,
            steps,
        )
        return Student(
            name, recipe, fraction, recipe_meta["param_fraction"], student.num_parameters(), str(directory), best, steps
        )


def compress(
    cfg: CompressConfig,
    pretrained_dir: str | Path,
    tokenized_dir: str | Path,
    out_dir: str | Path,
    tracking: Tracking | None = None,
    resume: bool = False,
) -> CompressResult:
    """Prune the pretrained LM in `pretrained_dir` to each of cfg.fractions and recover each by distillation."""
    make = Students(cfg, pretrained_dir, tokenized_dir, out_dir, tracking, resume)
    teacher, T = make.teacher, make.teacher.cfg.block_size
    calibration = fixed_windows(read_tokens(make.tokens, "train"), T, cfg.calibration_windows)
    importance = measure_importance(teacher, calibration, cfg.batch_size)
    log.info(
        "compress: teacher %.2fM parameters; the loss rise without each block: %s",
        make.teacher_params / 1e6,
        ", ".join(f"{v:+.3f}" for v in importance.block_loss_rise),
    )
    students: list[Student] = []
    with stage_run(tracking, "compress", tags={"gptcore.data_digest": make.tokens.data_digest}) as run:
        run.log_params({"compress": asdict(cfg), "teacher_params": make.teacher_params})
        run.log_metrics({f"importance/block_{i}_loss_rise": float(v) for i, v in enumerate(importance.block_loss_rise)})
        for fraction in cfg.fractions:
            shape = student_shape(teacher.cfg, fraction, cfg.prune)
            cut = {"n_layer": shape.n_layer, "n_embd": shape.n_embd}
            pruned, kept = prune(teacher, shape, importance)
            cut |= kept.describe()
            students.append(make.make(pruned, "prune", fraction, cut))
            recovery = cut | {"steps": cfg.max_steps, "temperature": cfg.temperature, "kl_weight": cfg.kl_weight}
            student, _ = prune(teacher, shape, importance)
            torch.manual_seed(cfg.seed)  # dropout's stream: the same whether or not the others ran
            students.append(make.make(student, "prune+distill", fraction, recovery, distill_loss(teacher, cfg), cfg))
            if cfg.scratch:
                torch.manual_seed(cfg.seed)
                scratch_cfg = dataclasses.replace(cfg, lr=cfg.scratch_lr, min_lr=cfg.scratch_lr / 10)
                details = {"n_layer": shape.n_layer, "n_embd": shape.n_embd, "steps": cfg.max_steps}
                students.append(make.make(GPT(shape), "scratch", fraction, details, lm_loss, scratch_cfg))
        result = CompressResult(str(out_dir), make.teacher_params, students)
        write_json(Path(out_dir) / RESULT_FILE, asdict(result))
        for s in students:
            run.log_metrics({f"{s.name}/val_loss": s.best_val_loss, f"{s.name}/param_fraction": s.param_fraction})
    return result
