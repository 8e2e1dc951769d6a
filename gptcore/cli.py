"""`gptcore`: one verb per stage, each calling the same function the Prefect flow calls.

    gptcore pipeline  [--preset tiny] [--config FILE] [--workdir DIR]   the whole Prefect flow
    gptcore ingest | tokenizer | pretrain [--resume] | finetune [--resume] | evaluate | export | register
    gptcore generate --model URI --prompt TEXT      gptcore score --model URI --input F --output F

Stage verbs read and write the standard places inside --workdir (see gptcore/layout.py), so
`gptcore ingest && gptcore tokenizer && gptcore pretrain ...` is the pipeline by hand.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable

from gptcore.config import PipelineConfig
from gptcore.presets import PRESETS, load_config
from gptcore.errors import GptcoreError
from gptcore.layout import Workdir
from gptcore.tracking import Tracking, load_settings


def _tracking(args) -> Tracking | None:
    if args.no_tracking:
        return None
    return Tracking(load_settings(args.workdir, args.mlflow_config), parent_run_id=args.parent_run_id)


def _print(result) -> None:
    from dataclasses import asdict, is_dataclass

    print(json.dumps(asdict(result) if is_dataclass(result) else result, indent=2, default=str))


def cmd_pipeline(args, cfg: PipelineConfig) -> None:
    from flows.pipeline import run_pipeline

    run_pipeline(args.preset, args.config, args.workdir, args.mlflow_config)


def cmd_ingest(args, cfg: PipelineConfig) -> None:
    from gptcore.data.ingest import ingest

    _print(ingest(cfg.ingest, Workdir(args.workdir).data, _tracking(args)))


def cmd_tokenizer(args, cfg: PipelineConfig) -> None:
    from gptcore.tokenizer import train_tokenizer

    w = Workdir(args.workdir)
    _print(train_tokenizer(cfg.tokenizer, w.data, w.tokenizer, _tracking(args)))


def cmd_pretrain(args, cfg: PipelineConfig) -> None:
    from gptcore.launch import pretrain_stage
    from gptcore.pretrain import pretrain

    w = Workdir(args.workdir)
    if "WORLD_SIZE" in os.environ:  # a rank that torchrun started: train, do not launch again
        _print(pretrain(cfg.model, cfg.pretrain, w.tokenizer, w.pretrain, _tracking(args), resume=args.resume))
    else:
        _print(pretrain_stage(cfg, w.root, _tracking(args), resume=args.resume))


def cmd_finetune(args, cfg: PipelineConfig) -> None:
    from gptcore.finetune import finetune

    w = Workdir(args.workdir)
    _print(finetune(cfg.finetune, w.pretrain, w.data, w.tokenizer, w.finetune, _tracking(args), resume=args.resume))


def cmd_evaluate(args, cfg: PipelineConfig) -> None:
    from gptcore.evaluate import evaluate_classifier, evaluate_lm

    w, t = Workdir(args.workdir), _tracking(args)
    if args.only in (None, "lm"):
        _print(evaluate_lm(cfg.evaluate, w.pretrain, w.tokenizer, w.eval, t))
    if args.only in (None, "classifier"):
        _print(evaluate_classifier(w.finetune, w.data, w.tokenizer, w.eval, t))


def cmd_export(args, cfg: PipelineConfig) -> None:
    from gptcore.export import export_classifier_onnx, export_lm_onnx

    w, t = Workdir(args.workdir), _tracking(args)
    if args.only in (None, "lm"):
        _print(export_lm_onnx(cfg.export, w.pretrain, w.tokenizer, w.export_lm, t))
    if args.only in (None, "classifier"):
        _print(export_classifier_onnx(cfg.export, w.finetune, w.data, w.tokenizer, w.export_classifier, t))


def cmd_register(args, cfg: PipelineConfig) -> None:
    from gptcore.registry import register

    w = Workdir(args.workdir)
    settings = load_settings(args.workdir, args.mlflow_config)
    if args.only in (None, "lm"):
        _print(register(w.export_lm, w.eval / "lm_eval.json", cfg.registry.lm_name, Tracking(settings), cfg.to_dict(),
                        cfg.registry))
    if args.only in (None, "classifier"):
        _print(register(w.export_classifier, w.eval / "classifier_eval.json", cfg.registry.classifier_name,
                        Tracking(settings), cfg.to_dict(), cfg.registry))


def cmd_generate(args, cfg: PipelineConfig) -> None:
    from gptcore.runtime import OnnxLM, load_model

    model = load_model(args.model, device=args.device, tracking_uri=load_settings(args.workdir, args.mlflow_config).tracking_uri)
    if not isinstance(model, OnnxLM):
        raise GptcoreError(f"{args.model}: is a classifier; `generate` needs a language model")
    text = model.generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    print(args.prompt + text)


def cmd_score(args, cfg: PipelineConfig) -> None:
    from gptcore.score import score

    _print(score(args.model, args.input, args.output, args.text_field, _tracking(args), args.batch_size, args.device))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptcore", description="Build a GPT from raw text, track it, register it, serve it.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--workdir", default="gptcore-work", help="where every stage reads and writes (default: %(default)s)")
    common.add_argument("--preset", default="default", choices=sorted(PRESETS), help="base configuration (default: %(default)s)")
    common.add_argument("--config", help="YAML or TOML file whose fields override the preset")
    common.add_argument("--mlflow-config", help="MLflow settings file (default: ./mlflow.yaml, else built-in defaults)")
    common.add_argument("--no-tracking", action="store_true", help="log nothing to MLflow")
    common.add_argument("--parent-run-id", help="nest this stage's MLflow run under that run (the pipeline's)")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, fn: Callable, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(fn=fn)
        return p

    verb("pipeline", cmd_pipeline, "run the whole pipeline as a Prefect flow")
    verb("ingest", cmd_ingest, "read, clean and split the corpus")
    verb("tokenizer", cmd_tokenizer, "train the BPE tokenizer and encode the splits")
    for name, fn in (("pretrain", cmd_pretrain), ("finetune", cmd_finetune)):
        p = verb(name, fn, f"{name} (resumable)")
        p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    for name, fn in (("evaluate", cmd_evaluate), ("export", cmd_export), ("register", cmd_register)):
        p = verb(name, fn, f"{name} the language model and the classifier")
        p.add_argument("--only", choices=["lm", "classifier"], help="just one of the two models")
    p = verb("generate", cmd_generate, "generate text with an ONNX language model")
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or a package directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p = verb("score", cmd_score, "classify a file of texts with an ONNX classifier into Parquet")
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or a package directory")
    p.add_argument("--input", required=True, help=".parquet, .jsonl or .csv with a text column")
    p.add_argument("--output", required=True, help="Parquet file to write")
    p.add_argument("--text-field", default="text")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return parser


def console_logging() -> None:
    """gptcore's progress lines on stderr; other libraries keep their own levels (no httpx chatter)."""
    logger = logging.getLogger("gptcore")
    if not any(getattr(h, "_gptcore_console", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
        handler._gptcore_console = True
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # Prefect's console handler on the root logger would print each line again


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console_logging()
    try:
        cfg = load_config(args.config, args.preset)  # validated here, before any work starts
        args.fn(args, cfg)
    except GptcoreError as e:
        print(f"gptcore {args.verb}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
