"""`gptcore`: one verb per stage, each calling the same function the Prefect flow calls.

    gptcore pipeline  [--preset tiny] [--config FILE] [--workdir DIR] [--fresh]   the whole Prefect flow
    gptcore ingest | tokenizer | pretrain [--resume] | finetune [--resume] | sft [--resume] | evaluate | export
    gptcore compress [--resume]   gptcore evaluate | export | register --student p50-distilled   (a student LM)
    gptcore register      gptcore export --format hf   (transformers GPT-2 checkpoints of the LM, chat model)
    gptcore generate --model URI --prompt TEXT      gptcore score --model URI --input F --output F
    gptcore evaluate --model URI [--model URI ...] --data FILE    versions side by side on one file
    gptcore explain --model URI --text TEXT [--steps N] [--html OUT.html]
    gptcore chat --model URI [--system TEXT]   talk with a chat model in the terminal (/help lists the commands)
    gptcore serve --model URI [--model URI ...] [--host H] [--port P]   HTTP API (token: $GPTCORE_SERVE_TOKEN)

Stage verbs read and write the standard places inside --workdir (see gptcore/layout.py), so
`gptcore ingest && gptcore tokenizer && gptcore pretrain ...` is the pipeline by hand. Each holds
the work directory's lock while it runs (`gptcore.locks`), as the pipeline flow does: a stage run
beside a flow, or beside another stage, on the same work directory is refused, naming the holder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable

from gptcore.config import PipelineConfig
from gptcore.errors import ConfigError, GptcoreError
from gptcore.layout import CLASSIFIER_EVAL, LM_EVAL, SFT_EVAL, Workdir
from gptcore.locks import refuse_if_held, workdir_lock
from gptcore.logs import console_logging
from gptcore.presets import PRESETS, load_config
from gptcore.runtime.serve.limits import add_serve_flags
from gptcore.tracking import Tracking, load_settings


def _tracking(args) -> Tracking | None:
    if args.no_tracking:
        return None
    return Tracking(load_settings(args.workdir, args.mlflow_config), parent_run_id=args.parent_run_id)


def _print(result) -> None:
    from dataclasses import asdict, is_dataclass

    print(json.dumps(asdict(result) if is_dataclass(result) else result, indent=2, default=str))


def cmd_pipeline(args, cfg: PipelineConfig) -> None:
    refuse_if_held(args.workdir)  # at once, before Prefect is imported and its server started; the flow holds it
    from flows.pipeline import run_pipeline

    run_pipeline(args.preset, args.config, args.workdir, args.mlflow_config, fresh=args.fresh)


def cmd_ingest(args, cfg: PipelineConfig) -> None:
    from gptcore.data.ingest import ingest

    _print(ingest(cfg.ingest, Workdir(args.workdir).data, _tracking(args)))


def cmd_tokenizer(args, cfg: PipelineConfig) -> None:
    from gptcore.data.tokenizer import train_tokenizer

    w = Workdir(args.workdir)
    _print(train_tokenizer(cfg.tokenizer, w.data, w.tokenizer, _tracking(args)))


def cmd_pretrain(args, cfg: PipelineConfig) -> None:
    from gptcore.train.launch import pretrain_stage
    from gptcore.train.pretrain import pretrain

    w = Workdir(args.workdir)
    if "WORLD_SIZE" in os.environ:  # a rank that torchrun started: train, do not launch again
        _print(pretrain(cfg.model, cfg.pretrain, w.tokenizer, w.pretrain, _tracking(args), resume=args.resume))
    else:
        _print(pretrain_stage(cfg, w.root, _tracking(args), resume=args.resume))


def cmd_finetune(args, cfg: PipelineConfig) -> None:
    from gptcore.train.finetune import finetune

    w = Workdir(args.workdir)
    _print(finetune(cfg.finetune, w.pretrain, w.data, w.tokenizer, w.finetune, _tracking(args), resume=args.resume))


def cmd_sft(args, cfg: PipelineConfig) -> None:
    from gptcore.train.sft import sft

    w = Workdir(args.workdir)
    _print(sft(cfg.sft, w.pretrain, w.data, w.tokenizer, w.sft, _tracking(args), resume=args.resume))


def cmd_compress(args, cfg: PipelineConfig) -> None:
    from gptcore.train.compress import compress

    w = Workdir(args.workdir)
    _print(compress(cfg.compress, w.pretrain, w.tokenizer, w.compress, _tracking(args), resume=args.resume))


def student(args) -> str | None:
    """--student's name, checked against the students the compress stage wrote (the LM's only)."""
    if args.student is None:
        return None
    if args.only not in (None, "lm"):
        raise ConfigError(f"--student: students are of the LM; --only {args.only} names another model")
    from gptcore.results import load_compressed

    return load_compressed(Workdir(args.workdir).compress).named(args.student).name


def cmd_evaluate(args, cfg: PipelineConfig) -> None:
    if args.model or args.data:
        return cmd_evaluate_versions(args, cfg)
    from gptcore.eval.chat import evaluate_sft
    from gptcore.eval.classifier import evaluate_classifier
    from gptcore.eval.lm import evaluate_lm

    w, t = Workdir(args.workdir), _tracking(args)
    if name := student(args):
        return _print(evaluate_lm(cfg.evaluate, w.student(name), w.tokenizer, w.student_eval(name), t, w.data))
    if args.only in (None, "lm"):
        _print(evaluate_lm(cfg.evaluate, w.pretrain, w.tokenizer, w.eval, t, data_dir=w.data))
    if args.only in (None, "classifier"):
        _print(evaluate_classifier(w.finetune, w.data, w.tokenizer, w.eval, t))
    if args.only in (None, "sft"):
        _print(evaluate_sft(cfg.sft, w.sft, w.pretrain, w.data, w.tokenizer, w.eval, t))


def cmd_evaluate_versions(args, cfg: PipelineConfig) -> None:
    from gptcore.registry.compare import evaluate_versions

    if not (args.model and args.data):
        raise ConfigError(
            "evaluate: --model and --data go together: the versions to evaluate, and the file to evaluate them on"
        )
    if args.only:
        raise ConfigError("evaluate: --only picks among the workdir's models; with --model, name the versions instead")
    settings = load_settings(args.workdir, args.mlflow_config)
    _print(
        evaluate_versions(
            args.model,
            args.data,
            args.text_field,
            args.label_field,
            args.output,
            _tracking(args),
            settings.tracking_uri,
            settings.registry_uri,
            cfg.registry,
            args.device,
        )
    )


def cmd_export(args, cfg: PipelineConfig) -> None:
    w = Workdir(args.workdir)
    if args.format == "hf":  # the LM, and the chat model unless --only lm; the classifier has no GPT-2 form
        from gptcore.export.hf import export_hf_stage

        if args.only == "classifier" or args.student:
            raise ConfigError(
                "export --format hf: writes the LM and chat model only; the classifier exports to onnx, as do students"
            )
        hf_dirs = (w.export("hf-lm"), w.export("hf-chat"))
        return _print(export_hf_stage(w.pretrain, w.tokenizer, w.sft, *hf_dirs, chat=args.only != "lm"))
    from gptcore.export.chat import export_chat_onnx
    from gptcore.export.classifier import export_classifier_onnx
    from gptcore.export.lm import export_lm_onnx

    t = _tracking(args)
    if name := student(args):
        return _print(export_lm_onnx(cfg.export, w.student(name), w.tokenizer, w.export(f"lm-{name}"), t))
    exports = {
        "lm": lambda: export_lm_onnx(cfg.export, w.pretrain, w.tokenizer, w.export("lm"), t),
        "classifier": lambda: export_classifier_onnx(
            cfg.export, w.finetune, w.data, w.tokenizer, w.export("classifier"), t
        ),
        "chat": lambda: export_chat_onnx(cfg.export, cfg.sft, w.sft, w.data, w.export("chat"), t),
    }
    for kind, export in exports.items():
        if args.only in (None, kind):
            _print(export())


def cmd_register(args, cfg: PipelineConfig) -> None:
    from gptcore.registry.register import register

    w = Workdir(args.workdir)
    tracking = Tracking(load_settings(args.workdir, args.mlflow_config))
    r = cfg.registry
    if name := student(args):
        evaluation = w.student_eval(name) / LM_EVAL
        return _print(register(w.export(f"lm-{name}"), evaluation, r.lm_name, tracking, cfg.to_dict(), r))
    for kind, evaluation, name in (
        ("lm", LM_EVAL, r.lm_name),
        ("classifier", CLASSIFIER_EVAL, r.classifier_name),
        ("chat", SFT_EVAL, r.chat_name),
    ):
        if args.only in (None, kind):
            _print(register(w.export(kind), w.eval / evaluation, name, tracking, cfg.to_dict(), r))


def cmd_generate(args, cfg: PipelineConfig) -> None:
    from gptcore.runtime import OnnxLM, load_model

    tracking_uri = load_settings(args.workdir, args.mlflow_config).tracking_uri
    model = load_model(args.model, args.device, args.threads, args.variant, tracking_uri=tracking_uri)
    if not isinstance(model, OnnxLM):
        raise GptcoreError(f"{args.model}: is a classifier; `generate` needs a language model")
    sampling = {k: getattr(args, k) for k in ("max_new_tokens", "temperature", "top_k", "top_p", "seed")}
    print(args.prompt + model.generate(args.prompt, **sampling))


def cmd_chat(args, cfg: PipelineConfig) -> None:
    from gptcore.runtime.terminal import Sampling, chat_in_terminal

    settings = load_settings(args.workdir, args.mlflow_config)
    chat_in_terminal(
        args.model,
        Sampling(args.max_tokens, args.temperature, args.top_k, args.top_p, args.seed),
        args.device,
        args.threads,
        args.variant,
        args.tracking_uri or settings.tracking_uri,
        args.registry_uri or settings.registry_uri,
        args.system,
        args.verbose,
    )


def cmd_score(args, cfg: PipelineConfig) -> None:
    from dataclasses import replace

    from gptcore.registry.score import score

    score_cfg = cfg.score if args.batch_size is None else replace(cfg.score, batch_size=args.batch_size)
    _print(score(args.model, args.input, args.output, args.text_field, _tracking(args), score_cfg, args.device))


def cmd_serve(args, cfg: PipelineConfig) -> None:
    from gptcore.runtime.serve.app import TOKEN_ENV, serve
    from gptcore.runtime.serve.limits import serve_config

    settings = load_settings(args.workdir, args.mlflow_config)
    serve(
        serve_config(args, settings.tracking_uri, settings.registry_uri),
        args.host,
        args.port,
        os.environ.get(TOKEN_ENV) or None,
    )


def cmd_explain(args, cfg: PipelineConfig) -> None:
    from gptcore.eval.explain import explain
    from gptcore.eval.explanation import format_table

    settings = load_settings(args.workdir, args.mlflow_config)
    explanation = explain(
        args.model,
        args.text,
        settings.tracking_uri,
        settings.registry_uri,
        args.steps,
        args.html,
        tokenizer=Workdir(args.workdir).tokenizer / "tokenizer.json",
    )
    print(format_table(explanation))


MODEL_HELP = "models:/NAME@ALIAS, models:/NAME/VERSION or a package directory"


def runtime_flags(p: argparse.ArgumentParser) -> None:
    """Where and how a verb runs an ONNX package."""
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--variant",
        default="auto",
        choices=["auto", "fp32", "fp16", "int8"],
        help="the package's precision variant (default: fp16 on CUDA where present, else fp32)",
    )
    p.add_argument("--threads", type=int, help="ONNX Runtime's CPU intra-op threads (default: all cores)")


def sampling_flags(p: argparse.ArgumentParser, max_tokens_flag: str, max_tokens: int) -> None:
    p.add_argument(max_tokens_flag, type=int, default=max_tokens, help="tokens per answer (default: %(default)s)")
    for flag, kind, default in (("--temperature", float, 0.8), ("--top-k", int, 50), ("--top-p", float, None)):
        p.add_argument(flag, type=kind, default=default, help="default: %(default)s")
    p.add_argument("--seed", type=int, help="the sampling seed (default: none, a fresh draw each time)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptcore", description="Build a GPT from raw text, track it, register it, serve it."
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--workdir", default="gptcore-work", help="where every stage reads and writes (default: %(default)s)"
    )
    common.add_argument(
        "--preset", default="default", choices=sorted(PRESETS), help="base configuration (default: %(default)s)"
    )
    common.add_argument("--config", help="YAML or TOML file whose fields override the preset")
    common.add_argument("--mlflow-config", help="MLflow settings file (default: ./mlflow.yaml, else built-in defaults)")
    common.add_argument("--no-tracking", action="store_true", help="log nothing to MLflow")
    common.add_argument("--parent-run-id", help="nest this stage's MLflow run under that run (the pipeline's)")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, fn: Callable, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(fn=fn)
        return p

    p = verb("pipeline", cmd_pipeline, "run the whole pipeline as a Prefect flow")
    p.add_argument(
        "--fresh", action="store_true", help="run every stage, even those an earlier run completed with the same inputs"
    )
    verb("ingest", cmd_ingest, "read, clean and split the corpus")
    verb("tokenizer", cmd_tokenizer, "train the BPE tokenizer and encode the splits")
    for name, fn in (
        ("pretrain", cmd_pretrain),
        ("finetune", cmd_finetune),
        ("sft", cmd_sft),
        ("compress", cmd_compress),
    ):
        p = verb(name, fn, f"{name} (resumable)")
        p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    pair = ["lm", "classifier"]
    for name, fn, models in (
        ("evaluate", cmd_evaluate, [*pair, "sft"]),
        ("export", cmd_export, [*pair, "chat"]),
        ("register", cmd_register, [*pair, "chat"]),
    ):
        p = verb(name, fn, f"{name} the workdir's models ({', '.join(models)})")
        p.add_argument("--only", choices=models, help="just one of them")
        p.add_argument("--student", help="a compressed student of the LM instead (a name `compress` printed)")
    sub.choices["export"].add_argument(
        "--format", choices=["onnx", "hf"], default="onnx", help="onnx packages, or transformers GPT-2 checkpoints (hf)"
    )
    p = sub.choices["evaluate"]
    p.add_argument(
        "--model",
        action="append",
        help="evaluate this version (models:/NAME@ALIAS, models:/NAME/VERSION "
        "or a package directory) on --data instead of the workdir's models; repeat it to compare "
        "versions with the first",
    )
    p.add_argument("--data", help=".parquet, .jsonl or .csv to evaluate the --model versions on")
    p.add_argument("--text-field", default="text")
    p.add_argument("--label-field", default="label", help="a classifier's labels: class names or integers")
    p.add_argument("--output", help="also write the report (JSON) here")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p = verb("generate", cmd_generate, "generate text with an ONNX language model")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--prompt", required=True)
    sampling_flags(p, "--max-new-tokens", 64)
    runtime_flags(p)
    p = verb("chat", cmd_chat, "talk with an ONNX chat model in the terminal, answers streamed (/help: the commands)")
    p.add_argument("--model", required=True, help=f"{MODEL_HELP} (or runs:/...)")
    p.add_argument("--system", help="the system turn to start with (/system TEXT changes it)")
    sampling_flags(p, "--max-tokens", 128)
    runtime_flags(p)
    p.add_argument("--tracking-uri", help="MLflow tracking URI of models:/ and runs:/ (default: --mlflow-config's)")
    p.add_argument("--registry-uri", help="MLflow registry URI (default: --mlflow-config's)")
    p.add_argument("--verbose", action="store_true", help="print each turn's prompt token ids on stderr")
    p = verb("score", cmd_score, "classify a file of texts with an ONNX classifier into Parquet")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--input", required=True, help=".parquet, .jsonl or .csv with a text column")
    p.add_argument("--output", required=True, help="Parquet file to write")
    p.add_argument("--text-field", default="text")
    p.add_argument(
        "--batch-size", type=int, help="texts per ONNX Runtime call (default: score.batch_size of the config)"
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p = verb(
        "serve",
        cmd_serve,
        "serve a language model, a chat model and/or a classifier over HTTP, OpenAI-compatible endpoints "
        "included (bearer token from $GPTCORE_SERVE_TOKEN)",
    )
    add_serve_flags(p)
    runtime_flags(p)
    p = verb(
        "explain", cmd_explain, "per-token attributions (integrated gradients) of the torch classifier for one text"
    )
    p.add_argument(
        "--model",
        required=True,
        help="models:/NAME@ALIAS, models:/NAME/VERSION or a checkpoint directory "
        "(one without tokenizer.json uses the workdir's tokenizer)",
    )
    p.add_argument("--text", required=True)
    p.add_argument("--steps", type=int, default=32, help="integration steps (default: %(default)s)")
    p.add_argument("--html", help="also write the explanation as an HTML page here")
    return parser


# The verbs that write the work directory; `pipeline` is locked by its flow.
WORKDIR_VERBS = ("ingest", "tokenizer", "pretrain", "finetune", "sft", "compress", "evaluate", "export", "register")


def writes_workdir(args) -> bool:
    if args.verb not in WORKDIR_VERBS or (args.verb == "pretrain" and "WORLD_SIZE" in os.environ):
        return False  # a rank torchrun started (as in cmd_pretrain): the launching command holds the lock
    return not (args.verb == "evaluate" and (args.model or args.data))  # versions on a file: writes --output only


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console_logging()
    try:
        cfg = load_config(args.config, args.preset)  # validated here, before any work starts
        with workdir_lock(args.workdir, f"gptcore {args.verb}") if writes_workdir(args) else contextlib.nullcontext():
            args.fn(args, cfg)
    except GptcoreError as e:
        print(f"gptcore {args.verb}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
