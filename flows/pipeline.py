"""The whole pipeline as one Prefect flow: each task calls exactly one gptcore stage function.

ingest -> tokenizer -> pretrain -> finetune, chat SFT -> evaluate (LM, classifier, chat) -> export (the three)
-> register + promote (the three) -> score the test split with the champion classifier; the new chat
version answers held-out conversations beside the champion. With `compress.enabled`, the LM's
pruned and distilled students are evaluated, exported and registered as versions of the LM too.

The LM always runs; the classifier branch (finetune to score) and the chat branch (SFT, its
evaluation, export and registration) run when enabled and the ingested corpus has their data
(`gptcore.data.availability`), decided right after ingestion; a skipped branch gets one log line
and a line in the summary.

Stages hand each other directories, never tensors, and one MLflow run named `pipeline` holds
a nested run per stage. With no Prefect server configured, Prefect starts a temporary local one.

A run that failed resumes where it stopped: run it again with the same inputs and each stage
that completed before is skipped, its result read back from WORKDIR/.prefect-results, as long as
its inputs, config, code and outputs are unchanged (`flows.stage_cache`); `fresh` runs them all.

A run holds the work directory's lock (`gptcore.locks`) from start to end: a second pipeline, or
a stage verb run by hand, on the same work directory is refused at once, naming this flow run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.futures import PrefectFuture
from prefect.states import State
from prefect.utilities.annotations import quote

from flows.stage_cache import stage_cache
from flows.summary import headline_metrics, pipeline_summary, promotion_markdown
from flows.tasks import (
    chat_versions_task,
    compress_task,
    evaluate_classifier_task,
    evaluate_lm_task,
    evaluate_sft_task,
    export_chat_task,
    export_classifier_task,
    export_lm_task,
    finetune_task,
    flow_run_tags,
    gptcore_logs_to_prefect,
    ingest_task,
    pretrain_task,
    register_chat_task,
    register_classifier_task,
    register_lm_task,
    score_task,
    sft_task,
    tokenizer_task,
)
from gptcore.data.availability import CHAT, CLASSIFIER, SCORE, optional_stages
from gptcore.errors import redact
from gptcore.layout import Workdir
from gptcore.locks import workdir_lock
from gptcore.presets import load_config
from gptcore.results import load_compressed
from gptcore.tracking import Tracking, load_settings, stage_run

# Each stage -> the stages it reads the outputs of (directly; the rest is transitive): the flow runs
# each task after these, so Prefect's graph of a run is the pipeline's, though stages hand over
# files rather than Prefect results. Stages of a branch the corpus has no data for do not run.
STAGE_GRAPH: dict[str, tuple[str, ...]] = {
    "ingest": (),
    "tokenizer": ("ingest",),
    "pretrain": ("tokenizer",),
    "finetune": ("pretrain",),
    "sft": ("pretrain",),
    "evaluate-lm": ("pretrain",),
    "evaluate-classifier": ("finetune",),
    "evaluate-sft": ("sft",),
    "export-lm": ("pretrain",),
    "export-classifier": ("finetune",),
    "export-chat": ("sft",),
    "register-lm": ("evaluate-lm", "export-lm"),
    "register-classifier": ("evaluate-classifier", "export-classifier"),
    "register-chat": ("evaluate-sft", "export-chat"),
    "chat-versions": ("register-chat",),
    "score": ("register-classifier",),
}


def compress_graph(students: list[str]) -> dict[str, tuple[str, ...]]:
    """The stages `compress.enabled` adds: each distilled student is evaluated, exported and
    registered as the LM is, after the LM's registration, so the gate judges it against the teacher."""
    graph: dict[str, tuple[str, ...]] = {"compress": ("pretrain",)}
    for name in students:
        graph[f"evaluate-{name}"] = graph[f"export-{name}"] = ("compress",)
        graph[f"register-{name}"] = (f"evaluate-{name}", f"export-{name}", "register-lm")
    return graph


# Prefect flow run id -> (MLflow run id, tracking URI) of the pipeline runs under way in this
# process: what `report_failure` points to.
_MLFLOW_RUNS: dict[str, tuple[str, str]] = {}


class Finished(PrefectFuture):
    """A stage that ran, as a future of its final state: what `wait_for` takes without looking inside.

    Given the stage's result or state instead, Prefect would also trace every object inside it
    (a version string "1" is one object in CPython) to whichever task returned it last.
    """

    def __init__(self, state: State):
        super().__init__(state.state_details.task_run_id)
        self._final_state = state

    def wait(self, timeout: float | None = None) -> None:
        return None  # it has finished

    def result(self, timeout: float | None = None, raise_on_failure: bool = True) -> Any:
        return self._final_state.result(raise_on_failure=raise_on_failure)

    def add_done_callback(self, fn) -> None:
        fn(self)


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
        ", ".join(failed) or "(none: outside the stages)",
        error,
        params.get("preset"),
        params.get("config_path"),
        Path(params.get("workdir", "gptcore-work")).resolve(),
        flow_run.id,
        f" ({url})" if url else "",
        f"MLflow run {mlflow_run[0]} at {mlflow_run[1]}" if mlflow_run else "no MLflow run",
    )


@flow(name="gptcore-pipeline", on_failure=[report_failure])
def pipeline_flow(
    preset: str = "default",
    config_path: str | None = None,
    workdir: str = "gptcore-work",
    mlflow_config: str | None = None,
    fresh: bool = False,
) -> dict[str, Any]:
    """Build, evaluate, export, register and serve a GPT, and a classifier and a chat model where the
    configured corpus has their data (labels, dialogue) and the config does not turn them off.

    Stages an earlier run completed with the same inputs are reused, unless `fresh`.
    """
    from prefect.runtime import flow_run

    holder = f"gptcore-pipeline flow run {flow_run.name} ({flow_run.id})"
    with gptcore_logs_to_prefect(), workdir_lock(workdir, holder), stage_cache(workdir, fresh):
        return _pipeline(preset, config_path, workdir, mlflow_config)


def _pipeline(preset: str, config_path: str | None, workdir: str, mlflow_config: str | None) -> dict[str, Any]:
    from prefect.runtime import flow_run

    logger = get_run_logger()
    start = time.perf_counter()
    cfg = load_config(config_path, preset)
    w = Workdir(workdir)
    settings = load_settings(w.root, mlflow_config)
    tags = flow_run_tags()
    with stage_run(Tracking(settings, run_tags=tags), "pipeline", tags={"gptcore.preset": preset}) as parent:
        _MLFLOW_RUNS[str(flow_run.id)] = (parent.run_id, redact(settings.tracking_uri))
        parent.log_params(cfg.to_dict())
        t = Tracking(settings, parent.run_id, tags)
        done: dict[str, State] = {}
        graph = dict(STAGE_GRAPH)

        def stage(task, *args, **kwargs):
            """Run one stage (its task's name is its name in `graph`) after its upstream stages:
            Prefect draws those edges, and only those. The arguments are quoted: Prefect would trace
            any argument holding an object an earlier task returned (a model name string, an
            interned literal) as one more edge."""
            name = task.name
            upstream = [Finished(done[up]) for up in graph[name] if up in done]
            quoted = {k: quote(v) for k, v in kwargs.items()}
            done[name] = task(*map(quote, args), wait_for=upstream, return_state=True, **quoted)
            return done[name].result()  # the stage's own error, if it failed

        data = stage(ingest_task, cfg.ingest, w.data, t)
        # Decided before pretraining: a branch the corpus has no data for costs nothing.
        skipped = optional_stages(cfg, w.data)
        for reason in skipped.values():
            if reason is not None:
                logger.info("%s", reason)
        run_classifier, run_chat = skipped[CLASSIFIER] is None, skipped[CHAT] is None
        finetuned = cls_eval = cls_pkg = cls_reg = scores = None
        chat = chat_eval = chat_pkg = chat_reg = chat_versions = None
        tokens = stage(tokenizer_task, cfg.tokenizer, w.data, w.tokenizer, t)
        pretrained = stage(pretrain_task, cfg, w.root, t)
        if run_classifier:
            finetuned = stage(finetune_task, cfg.finetune, w.pretrain, w.data, w.tokenizer, w.finetune, t)
        if run_chat:
            chat = stage(sft_task, cfg.sft, w.pretrain, w.data, w.tokenizer, w.sft, t)
        lm_eval = stage(evaluate_lm_task, cfg.evaluate, w.pretrain, w.tokenizer, w.eval, t, data_dir=w.data)
        if run_classifier:
            cls_eval = stage(evaluate_classifier_task, w.finetune, w.data, w.tokenizer, w.eval, t)
        if run_chat:
            chat_eval = stage(evaluate_sft_task, cfg.sft, w.sft, w.pretrain, w.data, w.tokenizer, w.eval, t)
        lm_pkg = stage(export_lm_task, cfg.export, w.pretrain, w.tokenizer, w.export("lm"), t)
        if run_classifier:
            cls_pkg = stage(
                export_classifier_task, cfg.export, w.finetune, w.data, w.tokenizer, w.export("classifier"), t
            )
        if run_chat:
            chat_pkg = stage(export_chat_task, cfg.export, cfg.sft, w.sft, w.data, w.export("chat"), t)
        config, registry = cfg.to_dict(), cfg.registry
        lm_reg = stage(register_lm_task, w.export("lm"), lm_eval.metrics_path, registry.lm_name, t, config, registry)
        student_regs = []
        if cfg.compress.enabled:
            graph |= compress_graph([])
            stage(compress_task, cfg.compress, w.pretrain, w.tokenizer, w.compress, t)
            students = [s.name for s in load_compressed(w.compress).by_recipe("prune+distill")]
            graph |= compress_graph(students)
            for name in students:
                evaluation = stage(
                    evaluate_lm_task.with_options(name=f"evaluate-{name}"),
                    cfg.evaluate,
                    w.student(name),
                    w.tokenizer,
                    w.student_eval(name),
                    t,
                    data_dir=w.data,
                )
                package = w.export(f"lm-{name}")
                stage(
                    export_lm_task.with_options(name=f"export-{name}"),
                    cfg.export,
                    w.student(name),
                    w.tokenizer,
                    package,
                    t,
                )
                register_student = register_lm_task.with_options(name=f"register-{name}")
                student_regs.append(
                    stage(register_student, package, evaluation.metrics_path, registry.lm_name, t, config, registry)
                )
        if run_classifier:
            cls_reg = stage(
                register_classifier_task,
                w.export("classifier"),
                cls_eval.metrics_path,
                registry.classifier_name,
                t,
                config,
                registry,
            )
        if run_chat:
            chat_reg = stage(
                register_chat_task, w.export("chat"), chat_eval.metrics_path, registry.chat_name, t, config, registry
            )
            chat_versions = stage(
                chat_versions_task, chat_reg, cfg.sft, str(w.data), settings.tracking_uri, settings.registry_uri
            )
        if skipped[SCORE] is None:
            test_split, scores_path = data.split_path("test"), w.scores / "test_scores.parquet"
            scores = stage(score_task, cls_reg.champion_uri, test_split, scores_path, "text", t, cfg.score)
        summary = pipeline_summary(
            workdir=w.root,
            settings=settings,
            experiment_id=t.experiment_id(),
            seconds=time.perf_counter() - start,
            skipped=skipped,
            data=data,
            tokens=tokens,
            pretrained=pretrained,
            finetuned=finetuned,
            chat=chat,
            lm_eval=lm_eval,
            cls_eval=cls_eval,
            chat_eval=chat_eval,
            lm_pkg=lm_pkg,
            cls_pkg=cls_pkg,
            chat_pkg=chat_pkg,
            lm_reg=lm_reg,
            cls_reg=cls_reg,
            chat_reg=chat_reg,
            scores=scores,
            chat_versions=chat_versions,
        )
        parent.log_metrics(headline_metrics(summary))
        parent.log_dict(summary, "summary.json")
        parent.set_tags({"mlflow.note.content": summary["table"]})  # the run page opens on the summary
    create_markdown_artifact(
        summary["markdown"], key="gptcore-pipeline-summary", description="gptcore pipeline summary"
    )
    create_markdown_artifact(
        promotion_markdown([reg for reg in (lm_reg, *student_regs, cls_reg, chat_reg) if reg is not None]),
        key="gptcore-promotion",
        description="registry: each new version, and whether it took the champion alias",
    )
    if chat_versions is not None:
        create_markdown_artifact(
            Path(chat_eval.samples_path).read_text(encoding="utf-8"),
            key="gptcore-chat-samples",
            description="chat SFT: base vs fine-tuned answers to held-out prompts",
        )
        create_markdown_artifact(
            chat_versions,
            key="gptcore-chat-versions",
            description="the new chat version beside the champion, on held-out conversations",
        )
    logger.info("\n%s", summary["text"])
    _MLFLOW_RUNS.pop(str(flow_run.id), None)
    return {k: v for k, v in summary.items() if k not in ("markdown", "table")}


def run_pipeline(
    preset: str = "default",
    config_path: str | Path | None = None,
    workdir: str | Path = "gptcore-work",
    mlflow_config: str | Path | None = None,
    fresh: bool = False,
) -> dict[str, Any]:
    """Plain-Python entry point of the flow (the CLI verb `gptcore pipeline`)."""
    return pipeline_flow(
        preset=preset,
        config_path=None if config_path is None else str(config_path),
        workdir=str(workdir),
        mlflow_config=None if mlflow_config is None else str(mlflow_config),
        fresh=fresh,
    )
