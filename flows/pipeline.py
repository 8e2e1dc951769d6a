"""The whole pipeline as one Prefect flow: each task calls exactly one gptcore stage function.

ingest -> tokenizer -> pretrain -> finetune, chat SFT -> evaluate (LM, classifier, chat) -> export (LM, classifier)
-> register + promote (both) -> score the test split with the champion classifier.

Stages hand each other directories, never tensors, and one MLflow run named `pipeline` holds
a nested run per stage. With no Prefect server configured, Prefect starts a temporary local one.

A run that failed resumes where it stopped: run it again with the same inputs and each stage
that completed before is skipped, its result read back from WORKDIR/.prefect-results, as long as
its inputs, config, code and outputs are unchanged (`gptcore.stage_cache`); `fresh` runs them all.
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
from gptcore.data.lineage import fingerprint
from gptcore.evaluate import DOC_BPB_FILE, PREDICTIONS_FILE, SCORING_REFERENCE_FILE, evaluate_classifier, evaluate_lm
from gptcore.export import export_classifier_onnx, export_lm_onnx
from gptcore.finetune import finetune
from gptcore.layout import Workdir
from gptcore.launch import pretrain_stage
from gptcore.registry import register
from gptcore.score import score
from gptcore.sft import sft
from gptcore.sft_eval import evaluate_sft
from gptcore.stage_cache import CachedStage, PathsOf, named, registered_aliases, stage_cache
from gptcore.summary import pipeline_summary, promotion_markdown
from gptcore.tokenizer import train_tokenizer
from gptcore.tracking import Tracking, is_transient, load_settings, stage_run


def _stage(fn, name: str, reads: PathsOf | None = None, writes: PathsOf | None = None, views=None, **options):
    """A task that calls one stage function; given what it reads and writes, one reused across runs.

    Prefect's default cache key includes the flow run id; a cached stage gets its key, per call,
    from `CachedStage` (inputs' digests, config, code), so the task itself has none.
    """
    stage = task(fn, name=name, cache_policy=NO_CACHE, **options)
    return stage if reads is None else CachedStage(stage, reads, writes, views)


def retry_if_transient(task, task_run, state) -> bool:
    """Retry a network hiccup (connection, timeout, HTTP 5xx/429), not bad input or a bug."""
    return is_transient(state.result(raise_on_failure=False))


# For the stages that reach over a network (the MLflow registry, the Hugging Face hub): backoff,
# with jitter so that runs failing together do not retry together.
NETWORK_RETRIES = {"retries": 3, "retry_delay_seconds": [2, 10, 30], "retry_jitter_factor": 0.5,
                   "retry_condition_fn": retry_if_transient}


def _files_in_out_dir(*names: str) -> PathsOf:
    # The evaluations share one directory: each owns only the files it writes there.
    return lambda params: [Path(params["out_dir"]) / name for name in names]


def _with_chat_data(reads: PathsOf) -> PathsOf:
    # Chat SFT also reads the conversations file of `sft.data`, when one is set.
    return lambda params: reads(params) + ([Path(params["cfg"].data)] if params["cfg"].data else [])


ingest_task = _stage(ingest, "ingest", reads=lambda p: [fingerprint(p["cfg"].sources, {}, [])],
                     writes=named("out_dir"), **NETWORK_RETRIES)
tokenizer_task = _stage(train_tokenizer, "tokenizer", reads=named("data_dir"), writes=named("out_dir"))
pretrain_task = _stage(pretrain_stage, "pretrain", reads=lambda p: [Workdir(p["workdir"]).tokenizer],
                       writes=lambda p: [Workdir(p["workdir"]).pretrain],
                       views={"cfg": lambda cfg: [cfg.model, cfg.pretrain]})  # the only sections it reads
finetune_task = _stage(finetune, "finetune", reads=named("pretrained_dir", "data_dir", "tokenized_dir"),
                       writes=named("out_dir"))
sft_task = _stage(sft, "sft", reads=_with_chat_data(named("pretrained_dir", "data_dir", "tokenized_dir")),
                  writes=named("out_dir"))
evaluate_lm_task = _stage(evaluate_lm, "evaluate-lm", reads=named("pretrained_dir", "tokenized_dir", "data_dir"),
                          writes=_files_in_out_dir("lm_eval.json", "samples.txt", DOC_BPB_FILE))
evaluate_classifier_task = _stage(
    evaluate_classifier, "evaluate-classifier", reads=named("finetuned_dir", "data_dir", "tokenized_dir"),
    writes=_files_in_out_dir("classifier_eval.json", "confusion_matrix.png", "attributions.html", PREDICTIONS_FILE,
                             SCORING_REFERENCE_FILE))
evaluate_sft_task = _stage(evaluate_sft, "evaluate-sft",
                           reads=_with_chat_data(named("sft_dir", "pretrained_dir", "data_dir", "tokenized_dir")),
                           writes=_files_in_out_dir("sft_eval.json", "sft_samples.md"))
export_lm_task = _stage(export_lm_onnx, "export-lm", reads=named("pretrained_dir", "tokenized_dir"),
                        writes=named("out_dir"))
export_classifier_task = _stage(export_classifier_onnx, "export-classifier",
                                reads=named("finetuned_dir", "data_dir", "tokenized_dir"), writes=named("out_dir"))
# What registering leaves is in the registry: reused while the model's aliases are where it left them.
register_task = _stage(register, "register", reads=named("package_dir", "eval_path"),
                       writes=lambda p: [registered_aliases(p["tracking"], p["name"])], **NETWORK_RETRIES)
# Scoring runs every time: its model is whichever version holds the champion alias now.
score_task = _stage(score, "score", **NETWORK_RETRIES)


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


# Prefect flow run id -> (MLflow run id, tracking URI) of the pipeline runs under way in this
# process: what `report_failure` points to.
_MLFLOW_RUNS: dict[str, tuple[str, str]] = {}


def report_failure(flow, flow_run, state) -> None:
    """on_failure: one log line with the stage that failed and its error, the inputs, and where the logs are."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.logging.loggers import flow_run_logger
    from prefect.utilities.urls import url_for

    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    failed = [run.name.rsplit("-", 1)[0] for run in task_runs if run.state is not None and run.state.is_failed()]
    error = state.result(raise_on_failure=False)
    error = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else state.message
    mlflow_run = _MLFLOW_RUNS.pop(str(flow_run.id), None)
    params, url = flow_run.parameters, url_for(flow_run)
    flow_run_logger(flow_run, flow).error(
        "pipeline failed at stage %s: %s | inputs: preset=%s config=%s workdir=%s | logs: Prefect flow run %s%s, %s | "
        "run it again with the same inputs to resume: the stages that completed are reused",
        ", ".join(failed) or "(none: outside the stages)", error, params.get("preset"), params.get("config_path"),
        Path(params.get("workdir", "gptcore-work")).resolve(), flow_run.id, f" ({url})" if url else "",
        f"MLflow run {mlflow_run[0]} at {mlflow_run[1]}" if mlflow_run else "no MLflow run")


@flow(name="gptcore-pipeline", on_failure=[report_failure])
def pipeline_flow(preset: str = "default", config_path: str | None = None, workdir: str = "gptcore-work",
                  mlflow_config: str | None = None, fresh: bool = False) -> dict[str, Any]:
    """Build, evaluate, export, register and serve a GPT and a classifier from the configured corpus.

    Stages an earlier run completed with the same inputs are reused, unless `fresh`.
    """
    with gptcore_logs_to_prefect(), stage_cache(workdir, fresh):
        return _pipeline(preset, config_path, workdir, mlflow_config)


def _pipeline(preset: str, config_path: str | None, workdir: str, mlflow_config: str | None) -> dict[str, Any]:
    from prefect.runtime import flow_run

    logger = get_run_logger()
    start = time.perf_counter()
    cfg = load_config(config_path, preset)
    w = Workdir(workdir)
    settings = load_settings(w.root, mlflow_config)
    with stage_run(Tracking(settings), "pipeline", tags={"gptcore.preset": preset}) as parent:
        _MLFLOW_RUNS[str(flow_run.id)] = (parent.run_id, settings.tracking_uri)
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
        scores = score_task(cls_reg.champion_uri, data.split_path("test"), w.scores / "test_scores.parquet", "text", t,
                            cfg.score)
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
    _MLFLOW_RUNS.pop(str(flow_run.id), None)
    return {k: v for k, v in summary.items() if k not in ("markdown",)}


def run_pipeline(preset: str = "default", config_path: str | Path | None = None, workdir: str | Path = "gptcore-work",
                 mlflow_config: str | Path | None = None, fresh: bool = False) -> dict[str, Any]:
    """Plain-Python entry point of the flow (the CLI verb `gptcore pipeline`)."""
    return pipeline_flow(preset=preset, config_path=None if config_path is None else str(config_path),
                         workdir=str(workdir), mlflow_config=None if mlflow_config is None else str(mlflow_config),
                         fresh=fresh)

