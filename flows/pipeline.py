"""The whole pipeline as one Prefect flow: each task calls exactly one gptcore stage function.

ingest -> tokenizer -> pretrain -> finetune, chat SFT -> evaluate (LM, classifier, chat) -> export (LM, classifier)
-> register + promote (both) -> score the test split with the champion classifier.

Stages hand each other directories, never tensors, and one MLflow run named `pipeline` holds
a nested run per stage. With no Prefect server configured, Prefect starts a temporary local one.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from gptcore.presets import load_config
from gptcore.data.ingest import ingest
from gptcore.evaluate import evaluate_classifier, evaluate_lm
from gptcore.export import export_classifier_onnx, export_lm_onnx
from gptcore.finetune import finetune
from gptcore.layout import Workdir
from gptcore.launch import pretrain_stage
from gptcore.registry import register
from gptcore.score import score
from gptcore.sft import sft
from gptcore.sft_eval import evaluate_sft
from gptcore.summary import pipeline_summary, promotion_markdown
from gptcore.tokenizer import train_tokenizer
from gptcore.tracking import Tracking, load_settings, stage_run


def _stage(fn, name: str, **options):
    # Results are paths and figures, cheap to recompute from their inputs; cross-run caching
    # needs a policy keyed on input digests, not Prefect's default (which includes the run id).
    return task(fn, name=name, cache_policy=NO_CACHE, **options)


ingest_task = _stage(ingest, "ingest")
tokenizer_task = _stage(train_tokenizer, "tokenizer")
pretrain_task = _stage(pretrain_stage, "pretrain")
finetune_task = _stage(finetune, "finetune")
sft_task = _stage(sft, "sft")
evaluate_lm_task = _stage(evaluate_lm, "evaluate-lm")
evaluate_classifier_task = _stage(evaluate_classifier, "evaluate-classifier")
evaluate_sft_task = _stage(evaluate_sft, "evaluate-sft")
export_lm_task = _stage(export_lm_onnx, "export-lm")
export_classifier_task = _stage(export_classifier_onnx, "export-classifier")
# The registry may sit behind a network: retry with backoff.
register_task = _stage(register, "register", retries=3, retry_delay_seconds=[2, 10, 30])
score_task = _stage(score, "score")


@contextlib.contextmanager
def gptcore_logs_to_prefect():
    """What PREFECT_LOGGING_EXTRA_LOGGERS=gptcore does, for the length of one flow run.

    The handlers come off again afterwards: outside a flow run they have no run to send to.
    """
    target = logging.getLogger("gptcore")
    added = [h for h in logging.getLogger("prefect.extra").handlers if h not in target.handlers]
    level = target.level
    target.setLevel(logging.INFO)
    for handler in added:
        target.addHandler(handler)
    try:
        yield
    finally:
        for handler in added:
            target.removeHandler(handler)
        target.setLevel(level)


@flow(name="gptcore-pipeline")
def pipeline_flow(preset: str = "default", config_path: str | None = None, workdir: str = "gptcore-work",
                  mlflow_config: str | None = None) -> dict[str, Any]:
    """Build, evaluate, export, register and serve a GPT and a classifier from the configured corpus."""
    with gptcore_logs_to_prefect():
        return _pipeline(preset, config_path, workdir, mlflow_config)


def _pipeline(preset: str, config_path: str | None, workdir: str, mlflow_config: str | None) -> dict[str, Any]:
    logger = get_run_logger()
    start = time.perf_counter()
    cfg = load_config(config_path, preset)
    w = Workdir(workdir)
    settings = load_settings(w.root, mlflow_config)
    with stage_run(Tracking(settings), "pipeline", tags={"gptcore.preset": preset}) as parent:
        parent.log_params(cfg.to_dict())
        t = Tracking(settings, parent.run_id)
        data = ingest_task(cfg.ingest, w.data, t)
        tokens = tokenizer_task(cfg.tokenizer, w.data, w.tokenizer, t)
        pretrained = pretrain_task(cfg, w.root, t)
        finetuned = finetune_task(cfg.finetune, w.pretrain, w.data, w.tokenizer, w.finetune, t)
        chat = sft_task(cfg.sft, w.pretrain, w.data, w.tokenizer, w.sft, t)
        lm_eval = evaluate_lm_task(cfg.evaluate, w.pretrain, w.tokenizer, w.eval, t, data_dir=w.data)
        cls_eval = evaluate_classifier_task(w.finetune, w.data, w.tokenizer, w.eval, t)
        chat_eval = evaluate_sft_task(cfg.sft, w.sft, w.pretrain, w.data, w.tokenizer, w.eval, t)
        lm_pkg = export_lm_task(cfg.export, w.pretrain, w.tokenizer, w.export_lm, t)
        cls_pkg = export_classifier_task(cfg.export, w.finetune, w.data, w.tokenizer, w.export_classifier, t)
        lm_reg = register_task(w.export_lm, lm_eval.metrics_path, cfg.registry.lm_name, t, cfg.to_dict(), cfg.registry)
        cls_reg = register_task(w.export_classifier, cls_eval.metrics_path, cfg.registry.classifier_name, t, cfg.to_dict(),
                                cfg.registry)
        scores = score_task(cls_reg.champion_uri, data.split_path("test"), w.scores / "test_scores.parquet", "text", t)
        summary = pipeline_summary(
            workdir=w.root, settings=settings, seconds=time.perf_counter() - start, data=data, tokens=tokens,
            pretrained=pretrained, finetuned=finetuned, chat=chat, lm_eval=lm_eval, cls_eval=cls_eval,
            chat_eval=chat_eval, lm_pkg=lm_pkg,
            cls_pkg=cls_pkg, lm_reg=lm_reg, cls_reg=cls_reg, scores=scores,
        )
        parent.log_metrics({"pipeline_seconds": summary["seconds"]})
        parent.log_dict(summary, "summary.json")
    create_markdown_artifact(summary["markdown"], key="gptcore-pipeline-summary", description="gptcore pipeline summary")
    create_markdown_artifact(promotion_markdown([lm_reg, cls_reg]), key="gptcore-promotion",
                             description="registry: each new version, and whether it took the champion alias")
    create_markdown_artifact(Path(chat_eval.samples_path).read_text(encoding="utf-8"), key="gptcore-chat-samples",
                             description="chat SFT: base vs fine-tuned answers to held-out prompts")
    logger.info("\n%s", summary["text"])
    return {k: v for k, v in summary.items() if k not in ("markdown",)}


def run_pipeline(preset: str = "default", config_path: str | Path | None = None, workdir: str | Path = "gptcore-work",
                 mlflow_config: str | Path | None = None) -> dict[str, Any]:
    """Plain-Python entry point of the flow (the CLI verb `gptcore pipeline`)."""
    return pipeline_flow(preset=preset, config_path=None if config_path is None else str(config_path),
                         workdir=str(workdir), mlflow_config=None if mlflow_config is None else str(mlflow_config))

