"""An ONNX model package, written atomically and only when its graph matches PyTorch.

A model package is a directory that `gptcore.runtime` serves without torch:
    model.onnx            the graph and weights, fused for ONNX Runtime (`gptcore.export.variants`)
    model.fp16.onnx       the fp16 variant, model.int8.onnx the int8 variant (where they pass parity)
    tokenizer.json        the tokenizer the model was trained with
    tokenizer_config.json, special_tokens_map.json
                          the Hugging Face tokenizer files (a chat model's with its chat template),
                          for apps that format with `transformers`
    gptcore_model.json    kind, shapes, special token ids, labels, (chat) the template's tokens, digests,
                          each variant's parity figures, the fused-op counts, and (classifier) the
                          checkpoint it came from, which the registry attaches to the version

The package is written only when the fp32 graph's parity holds (each kind's exporter says what
that means, `gptcore.export.lm` and `gptcore.export.classifier`); otherwise the stage raises
`ParityError` and leaves any earlier package in place. A precision variant is kept only when
its argmax agrees with PyTorch's on the configured share of validation positions; one that does
not is left out, with a warning.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import onnx
import torch

from gptcore.config import ExportConfig
from gptcore.export.hf import write_hf_tokenizer_files
from gptcore.export.variants import VARIANT_FILES, build_variant, fused_op_counts, optimize_graph
from gptcore.fsutil import atomic_dir, write_json
from gptcore.layout import EOT, PACKAGE_DIGEST_TAG, PACKAGE_META, PAD
from gptcore.model import GPT
from gptcore.results import ExportResult, load_export
from gptcore.runtime.package import package_digest
from gptcore.runtime.template import HF_CHAT_TEMPLATE, ROLES
from gptcore.tracking import Tracking, stage_run

log = logging.getLogger("gptcore.export")

FORMAT_VERSION = 3  # 3: the LM graph's cache is a fixed buffer written in place (gptcore.export.lm)


def torch_to_onnx(
    module: torch.nn.Module,
    args: tuple,
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes: dict,
    opset: int,
) -> None:
    """`module` traced by torch.onnx's dynamo exporter into `path`, with its dynamic axes."""
    # One self-contained file unless the weights pass protobuf's 2 GB limit (then model.onnx.data beside it).
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    with warnings.catch_warnings(), quiet_logger("torch.onnx._internal.exporter._registration"):
        # The exporter notes that axes sharing one constraint share a name, and that torchvision
        # (which we do not use) is missing: neither says anything about our graph.
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used", category=UserWarning)
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            dynamo=True,
            opset_version=opset,
            verbose=False,
            external_data=weight_bytes > 1 << 30,
        )


@contextlib.contextmanager
def quiet_logger(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def package_meta(kind: str, gpt: GPT, tok, model_meta: dict, parity: dict) -> dict:
    cfg = gpt.cfg
    return {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "block_size": cfg.block_size,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "head_dim": cfg.n_embd // cfg.n_head,
        "vocab_size": cfg.vocab_size,
        "eos_token_id": tok.token_to_id(EOT),
        "pad_token_id": tok.token_to_id(PAD),
        "labels": model_meta.get("labels", []),
        "model": model_meta["model"],
        "data_digest": model_meta["data_digest"],
        "tokenizer_digest": model_meta["tokenizer_digest"],
        "tokens_digest": model_meta.get("tokens_digest"),
        "parity": parity,
        "checkpoint": model_meta.get("checkpoint"),
        "num_params": gpt.num_parameters(),
        "compression": model_meta.get("compression"),  # a compressed student's recipe (`gptcore.train.compress`)
    } | ({"chat": chat_meta(model_meta)} if kind == "chat" else {})


def chat_meta(model_meta: dict) -> dict:
    """How a conversation is formatted: each role's token, every template token's id, the same as Jinja."""
    return {"tokens": model_meta["sft"]["chat_tokens"], "roles": ROLES, "hf_chat_template": HF_CHAT_TEMPLATE}


def add_variants(cfg: ExportConfig, tmp: Path, meta: dict, parity_of) -> dict:
    """Build each configured variant beside model.onnx and keep those whose agreement reaches its floor.

    `parity_of(variant, package_dir)` measures a variant against PyTorch; returns {variant: {file, parity}}.
    """
    variants = {"fp32": {"file": VARIANT_FILES["fp32"], "parity": meta["parity"]}}
    for variant in cfg.variants:
        path = build_variant(variant, tmp / VARIANT_FILES["fp32"], tmp)
        write_json(tmp / PACKAGE_META, meta | {"variants": variants | {variant: {"file": path.name}}})
        parity = parity_of(variant, tmp)
        floor = getattr(cfg, f"min_agreement_{variant}")
        parity["min_agreement"] = floor
        if parity["greedy_agreement"] >= floor:
            variants[variant] = {"file": path.name, "parity": parity}
        else:
            log.warning(
                "export: %s variant left out: argmax agreement %.4f < %.2f (export.min_agreement_%s)",
                variant,
                parity["greedy_agreement"],
                floor,
                variant,
            )
            path.unlink()
            meta.setdefault("variants_left_out", {})[variant] = parity
    return variants


def cache_format(kind: str, graph: Path) -> dict:
    """The format an LM graph's inputs are of, where it is not FORMAT_VERSION's: a growing cache
    (`fixed_cache=False`, which the KV-cache benchmark compares) takes the attention mask of format 2,
    and the runtime refuses a description that does not say so."""
    if kind == "classifier":
        return {}
    inputs = {i.name for i in onnx.load(graph, load_external_data=False).graph.input}
    return {"format_version": 2} if "attention_mask" in inputs else {}


def write_graph(export_graph, tmp: Path, cfg: ExportConfig) -> dict:
    """Export to model.onnx, fused unless export.optimize is off; returns the fusions applied and fused-op counts."""
    target = tmp / VARIANT_FILES["fp32"]
    if not cfg.optimize:
        export_graph(target)
        return {"fusions": {}, "fused_ops": fused_op_counts(target)}
    raw = tmp / "graph.unfused.onnx"
    export_graph(raw)
    fusions = optimize_graph(raw, target)
    raw.unlink()
    return {"fusions": fusions, "fused_ops": fused_op_counts(target)}


def write_package(
    out_dir: Path,
    kind: str,
    export_graph,
    gpt: GPT,
    tok,
    tokenizer_json: Path,
    model_meta: dict,
    cfg: ExportConfig,
    parity_of,
) -> ExportResult:
    """Export, fuse, check fp32 parity, add the variants, and describe it all: the package in `out_dir`.

    `export_graph(path)` writes the unfused graph; `parity_of(variant, package_dir)` measures a
    variant against PyTorch (and raises for an fp32 graph that does not match).
    """
    with atomic_dir(out_dir) as tmp:
        graph = write_graph(export_graph, tmp, cfg)
        graph |= cache_format(kind, tmp / VARIANT_FILES["fp32"])
        write_hf_tokenizer_files(tokenizer_json, tmp, gpt.cfg.block_size, chat=kind == "chat")
        write_json(tmp / PACKAGE_META, package_meta(kind, gpt, tok, model_meta, {}) | graph)
        meta = package_meta(kind, gpt, tok, model_meta, parity_of("fp32", tmp)) | graph
        meta["variants"] = add_variants(cfg, tmp, meta, parity_of)
        write_json(tmp / PACKAGE_META, meta)
        result = ExportResult(str(out_dir), kind, (tmp / "model.onnx").stat().st_size, meta["parity"])
    log.info(
        "export: %s -> %s (%.1f MB); fused ops %s; variants %s; parity %s",
        kind,
        out_dir,
        result.onnx_bytes / 1e6,
        graph["fused_ops"],
        ", ".join(meta["variants"]),
        meta["parity"],
    )
    return result


def log_export(tracking: Tracking | None, name: str, result: ExportResult, model_meta: dict) -> None:
    meta = load_export(result.package_dir)
    tags = {"gptcore.data_digest": model_meta["data_digest"]}
    if tracking is not None:
        tags[PACKAGE_DIGEST_TAG] = package_digest(Path(result.package_dir))
    with stage_run(tracking, name, tags=tags) as run:
        figures = {
            f"parity/{variant}_{k}": float(v)
            for variant, entry in meta["variants"].items()
            for k, v in entry["parity"].items()
            if isinstance(v, (int, float))
        }
        run.log_metrics(
            figures | {f"fused/{k}": v for k, v in meta["fused_ops"].items()} | {"onnx/bytes": result.onnx_bytes}
        )
        run.log_params({"variants": ",".join(meta["variants"]), "optimized": bool(meta["fusions"])})
        run.log_artifact(Path(result.package_dir) / PACKAGE_META)  # the graphs themselves go to the registry
