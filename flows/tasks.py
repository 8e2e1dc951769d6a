"""One Prefect task per gptcore stage function, each with the retries and the stage cache it needs.

A task calls exactly one stage function with the arguments the flow gives it. Stages that
completed in an earlier run with the same inputs, config, code and intact outputs are reused
from the stage cache (`flows.stage_cache`); stages that reach over a network retry transient
failures with backoff.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.stage_cache import CachedStage, PathsOf, named, registered_aliases
from gptcore.data.ingest import ingest
from gptcore.data.lineage import fingerprint
from gptcore.data.tokenizer import train_tokenizer
from gptcore.eval.chat import evaluate_sft
from gptcore.eval.classifier import evaluate_classifier
from gptcore.eval.lm import evaluate_lm
from gptcore.export.chat import export_chat_onnx
from gptcore.export.classifier import export_classifier_onnx
from gptcore.export.lm import export_lm_onnx
from gptcore.layout import EVAL_FILES, Workdir
from gptcore.logs import quiet_libraries
from gptcore.registry.chat_samples import chat_versions_markdown
from gptcore.registry.register import register
from gptcore.registry.score import score
from gptcore.tracking import is_transient
from gptcore.train.compress import compress
from gptcore.train.finetune import finetune
from gptcore.train.launch import pretrain_stage
from gptcore.train.sft import sft


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


# For the stages that reach over a network (the MLflow registry, the Hugging Face hub): a delay,
# with jitter so that runs failing together do not retry together. One number, not a list of
# growing delays: Prefect keeps the option as given in the task run's `empirical_policy.retry_delay`,
# and its UI formats that field as one duration in seconds, so a list shows as "NaN s".
NETWORK_RETRIES = {
    "retries": 3,
    "retry_delay_seconds": 10,
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": retry_if_transient,
}


def _eval_files(kind: str) -> PathsOf:
    # The evaluations share one directory: each owns only the files it writes there.
    return lambda params: [Path(params["out_dir"]) / name for name in EVAL_FILES[kind]]


def _with_chat_data(reads: PathsOf, sft_cfg: str = "cfg") -> PathsOf:
    # The chat stages also read the conversations file of `sft.data`, when one is set.
    return lambda params: reads(params) + ([Path(params[sft_cfg].data)] if params[sft_cfg].data else [])


ingest_task = _stage(
    ingest,
    "ingest",
    reads=lambda p: [fingerprint(p["cfg"].sources, {}, [])],
    writes=named("out_dir"),
    **NETWORK_RETRIES,
)
tokenizer_task = _stage(train_tokenizer, "tokenizer", reads=named("data_dir"), writes=named("out_dir"))
pretrain_task = _stage(
    pretrain_stage,
    "pretrain",
    reads=lambda p: [Workdir(p["workdir"]).tokenizer],
    writes=lambda p: [Workdir(p["workdir"]).pretrain],
    views={"cfg": lambda cfg: [cfg.model, cfg.pretrain]},  # the only sections of the config it reads
)
finetune_task = _stage(
    finetune, "finetune", reads=named("pretrained_dir", "data_dir", "tokenized_dir"), writes=named("out_dir")
)
sft_task = _stage(
    sft, "sft", reads=_with_chat_data(named("pretrained_dir", "data_dir", "tokenized_dir")), writes=named("out_dir")
)
evaluate_lm_task = _stage(
    evaluate_lm, "evaluate-lm", reads=named("pretrained_dir", "tokenized_dir", "data_dir"), writes=_eval_files("lm")
)
evaluate_classifier_task = _stage(
    evaluate_classifier,
    "evaluate-classifier",
    reads=named("finetuned_dir", "data_dir", "tokenized_dir"),
    writes=_eval_files("classifier"),
)
evaluate_sft_task = _stage(
    evaluate_sft,
    "evaluate-sft",
    reads=_with_chat_data(named("sft_dir", "pretrained_dir", "data_dir", "tokenized_dir")),
    writes=_eval_files("sft"),
)
compress_task = _stage(compress, "compress", reads=named("pretrained_dir", "tokenized_dir"), writes=named("out_dir"))
export_lm_task = _stage(
    export_lm_onnx, "export-lm", reads=named("pretrained_dir", "tokenized_dir"), writes=named("out_dir")
)
export_classifier_task = _stage(
    export_classifier_onnx,
    "export-classifier",
    reads=named("finetuned_dir", "data_dir", "tokenized_dir"),
    writes=named("out_dir"),
)
export_chat_task = _stage(
    export_chat_onnx,
    "export-chat",
    reads=_with_chat_data(named("sft_dir", "data_dir"), sft_cfg="sft_cfg"),
    writes=named("out_dir"),
)
# What registering leaves is in the registry: reused while the model's aliases are where it left them.
# One task per model, so that each is named for what it registers.
register_task = _stage(
    register,
    "register",
    reads=named("package_dir", "eval_path"),
    writes=lambda p: [registered_aliases(p["tracking"], p["name"])],
    **NETWORK_RETRIES,
)
register_lm_task, register_classifier_task, register_chat_task = (
    register_task.with_options(name=f"register-{kind}") for kind in ("lm", "classifier", "chat")
)
# Scoring runs every time: its model is whichever version holds the champion alias now.
score_task = _stage(score, "score", **NETWORK_RETRIES)
# The new chat version beside the champion it challenged, on held-out conversations: a report, made every run.
chat_versions_task = _stage(chat_versions_markdown, "chat-versions", **NETWORK_RETRIES)


def flow_run_tags() -> tuple[tuple[str, str], ...]:
    """Tags for every MLflow run of this flow run: MLflow's Source column names the flow and its run."""
    from prefect.runtime import flow_run

    return (
        ("mlflow.source.name", f"{flow_run.flow_name} (Prefect flow run {flow_run.name})"),
        ("mlflow.source.type", "JOB"),
        ("prefect.flow_run_id", str(flow_run.id)),
    )


@contextlib.contextmanager
def gptcore_logs_to_prefect():
    """What PREFECT_LOGGING_EXTRA_LOGGERS=gptcore does, for the length of one flow run, with the
    libraries quiet (`gptcore.logs`).

    The handlers come off again afterwards: outside a flow run they have no run to send to.
    """
    quiet_libraries()
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
