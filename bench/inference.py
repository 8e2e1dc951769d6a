"""Inference speed: PyTorch eager (with its KV cache) against ONNX Runtime, variant by variant.

    python bench/inference.py [--workdir gptcore-work] [--models default gpt2-124m] [--device cpu]
                              [--threads N] [--json rows.json]

For each model, on one device, in one run:
- generation, greedy, PROMPT prompt tokens (at most the context) and NEW new tokens per row, at
  batch 1 and batch 16:
  tokens/s (all rows) and ms/token (wall time per decoding step);
- classification of passages of PROMPT tokens in batches of 32: rows/s.
PyTorch runs `GPT.generate` (KV cache, no autocast on CPU; fp16 autocast on CUDA); ONNX Runtime
runs `gptcore.runtime` over the package that `gptcore.export.package.write_package` builds: fp32
(fused), fp32-unfused (the plain export, for scale), fp16 and int8.

Models: `default`, the trained LM and classifier of a pipeline work directory (`gptcore pipeline
--workdir DIR` first), whose packages carry the agreement figures (argmax agreement with
PyTorch fp32 over validation positions, teacher-forced); and `gpt2-124m`, GPT-2 small's shape
(12 x 768, context 1024, vocabulary 50304) with random weights: fine for speed, meaningless
for agreement, so its variants are kept whatever their agreement and report none.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import write_json  # bench/machine.py: the machine beside the figures

from gptcore.config import ExportConfig
from gptcore.export.classifier import check_classifier_parity, export_classifier_graph
from gptcore.export.lm import check_lm_parity, export_lm_graph
from gptcore.export.package import write_package
from gptcore.layout import (
    PAD,
    Workdir,
)
from gptcore.model import GPT, GPTClassifier
from gptcore.presets import gpt2_124m
from gptcore.results import load_finetuned, load_pretrained, load_tokenized, load_tokenizer, read_tokens
from gptcore.runtime import load_model
from gptcore.weights import load_classifier, load_lm

PROMPT, NEW, BATCHES, CLASSIFY_BATCH = 128, 128, (1, 16), 32


@dataclasses.dataclass
class Subject:
    """One model as both engines see it."""

    name: str
    gpt: GPT
    classifier: GPTClassifier
    prompts: np.ndarray  # (16, P) token ids, P = PROMPT or the context if shorter
    lm_dir: Path
    classifier_dir: Path


def build_packages(
    gpt: GPT,
    classifier: GPTClassifier,
    tok,
    tokenizer_json: Path,
    meta: dict,
    val: np.ndarray,
    out: Path,
    cfg: ExportConfig,
) -> tuple[Path, Path]:
    """Both packages (fp32 fused + variants) and the unfused fp32 LM beside them, through the export's own code."""
    pad = tok.token_to_id(PAD)
    n = min(PROMPT, gpt.cfg.block_size)
    passages = [val[i * n : (i + 1) * n].tolist() for i in range(8)]
    lm_meta = meta | {"model": dataclasses.asdict(gpt.cfg), "labels": []}
    clf_meta = meta | {"model": dataclasses.asdict(classifier.gpt.cfg)}
    write_package(
        out / "lm",
        "lm",
        lambda p: export_lm_graph(gpt, p, cfg.opset),
        gpt,
        tok,
        tokenizer_json,
        lm_meta,
        cfg,
        functools.partial(check_lm_parity, gpt, val, cfg),
    )
    write_package(
        out / "lm-unfused",
        "lm",
        lambda p: export_lm_graph(gpt, p, cfg.opset),
        gpt,
        tok,
        tokenizer_json,
        lm_meta,
        dataclasses.replace(cfg, optimize=False, variants=[]),
        functools.partial(check_lm_parity, gpt, val, cfg),
    )
    write_package(
        out / "classifier",
        "classifier",
        lambda p: export_classifier_graph(classifier, p, cfg.opset),
        classifier.gpt,
        tok,
        tokenizer_json,
        clf_meta,
        cfg,
        functools.partial(check_classifier_parity, classifier, passages, pad, cfg),
    )
    return out / "lm", out / "classifier"


def default_subject(workdir: Path, out: Path) -> Subject:
    w = Workdir(workdir)
    if not (w.pretrain / "result.json").is_file() or not (w.finetune / "result.json").is_file():
        sys.exit(f"{workdir}: no trained default model; run `gptcore pipeline --workdir {workdir}` first")
    gpt, meta = load_lm(load_pretrained(w.pretrain).best_dir)
    classifier, clf_meta = load_classifier(load_finetuned(w.finetune).best_dir)
    tok = load_tokenizer(w.tokenizer)
    val = np.asarray(read_tokens(load_tokenized(w.tokenizer), "val"), dtype=np.int64)
    lm_dir, clf_dir = build_packages(
        gpt,
        classifier,
        tok,
        w.tokenizer / "tokenizer.json",
        meta | {"labels": clf_meta["labels"]},
        val,
        out / "default",
        ExportConfig(),
    )
    n = min(PROMPT, gpt.cfg.block_size)
    prompts = np.stack([val[i * n : (i + 1) * n] for i in range(16)])
    return Subject("default", gpt, classifier, prompts, lm_dir, clf_dir)


def gpt2_subject(workdir: Path, out: Path) -> Subject:
    torch.manual_seed(0)
    gpt = GPT(dataclasses.replace(gpt2_124m().model, vocab_size=gpt2_124m().tokenizer.vocab_size)).eval()
    classifier = GPTClassifier(gpt, 6).eval()
    w = Workdir(workdir)  # any byte-level tokenizer: the bench feeds token ids, the package only needs one
    tok = load_tokenizer(w.tokenizer)
    # one context window for the parity check (its logits alone take 200 MB), prompts apart
    val = torch.randint(0, gpt.cfg.vocab_size, (gpt.cfg.block_size + 16,), generator=torch.Generator().manual_seed(1))
    prompts = torch.randint(0, gpt.cfg.vocab_size, (16, PROMPT), generator=torch.Generator().manual_seed(2))
    meta = {"data_digest": "random-weights", "tokenizer_digest": "none", "labels": [f"class{i}" for i in range(6)]}
    # Random weights give near-flat logits, so agreement says nothing here: keep every variant.
    cfg = ExportConfig(min_agreement_fp16=0.0, min_agreement_int8=0.0)
    lm_dir, clf_dir = build_packages(
        gpt, classifier, tok, w.tokenizer / "tokenizer.json", meta, val.numpy(), out / "gpt2-124m", cfg
    )
    return Subject("gpt2-124m", gpt, classifier, prompts.numpy(), lm_dir, clf_dir)


def timed(fn, repeats: int) -> tuple[float, object]:
    """The best of `repeats` timed calls (after one warm-up call), and the last result."""
    fn(warmup=True)
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn(warmup=False)
        best = min(best, time.perf_counter() - start)
    return best, result


def torch_generate(gpt: GPT, prompts: torch.Tensor, device: str):
    def run(warmup: bool):
        with torch.inference_mode(), torch.autocast("cuda", torch.float16, enabled=device == "cuda"):
            out = gpt.generate(prompts, 4 if warmup else NEW, temperature=0.0)
        if device == "cuda":
            torch.cuda.synchronize()
        return out[:, prompts.shape[1] :].cpu().numpy()

    return run


def torch_classify(classifier: GPTClassifier, passages: torch.Tensor, device: str):
    def run(warmup: bool):
        with torch.inference_mode(), torch.autocast("cuda", torch.float16, enabled=device == "cuda"):
            for i in range(0, CLASSIFY_BATCH if warmup else len(passages), CLASSIFY_BATCH):
                classifier(passages[i : i + CLASSIFY_BATCH], torch.ones_like(passages[i : i + CLASSIFY_BATCH]))
        if device == "cuda":
            torch.cuda.synchronize()

    return run


def bench_subject(s: Subject, device: str, threads: int | None, repeats: int) -> list[dict]:
    torch_device = torch.device(device)
    gpt, classifier = s.gpt.to(torch_device), s.classifier.to(torch_device)
    engines = [("onnxruntime", v) for v in ("fp32", "fp32-unfused", "fp16", "int8")]
    rows = []
    for batch in BATCHES:
        prompts = torch.from_numpy(s.prompts[:batch]).to(torch_device)
        base, torch_ids = timed(torch_generate(gpt, prompts, device), repeats)
        rows.append(
            row(
                s,
                device,
                "torch",
                "fp16-autocast" if device == "cuda" else "fp32",
                "generate",
                batch,
                base,
                base,
                None,
                None,
            )
        )
        for engine, variant in engines:
            package = s.lm_dir.parent / "lm-unfused" if variant == "fp32-unfused" else s.lm_dir
            lm = load_model(package, device=device, threads=threads, variant=variant.split("-")[0])
            rows_ids = s.prompts[:batch].tolist()

            def run(warmup: bool, lm=lm, rows_ids=rows_ids):
                return np.array(
                    lm.generate_batch_ids(rows_ids, 4 if warmup else NEW, temperature=0.0, stop_at_eos=False)
                )

            seconds, ids = timed(run, repeats)
            agreement = (
                lm.package.variants[lm.variant]["parity"].get("greedy_agreement") if s.name == "default" else None
            )
            rows.append(
                row(
                    s,
                    device,
                    engine,
                    variant,
                    "generate",
                    batch,
                    seconds,
                    base,
                    agreement,
                    float((ids == torch_ids).mean()),
                )
            )
    passages = torch.from_numpy(np.concatenate([s.prompts] * 4)).to(torch_device)  # 64 rows of P tokens
    base, _ = timed(torch_classify(classifier, passages, device), repeats)
    rows.append(
        row(
            s,
            device,
            "torch",
            "fp16-autocast" if device == "cuda" else "fp32",
            "classify",
            CLASSIFY_BATCH,
            base,
            base,
            None,
            None,
            len(passages),
        )
    )
    for variant in ("fp32", "fp16", "int8"):
        clf = load_model(s.classifier_dir, device=device, threads=threads, variant=variant)
        ids = passages.cpu().numpy()

        def run(warmup: bool, clf=clf, ids=ids):
            for i in range(0, CLASSIFY_BATCH if warmup else len(ids), CLASSIFY_BATCH):
                clf.forward_logits(ids[i : i + CLASSIFY_BATCH], np.ones_like(ids[i : i + CLASSIFY_BATCH]))

        seconds, _ = timed(run, repeats)
        agreement = clf.package.variants[variant]["parity"].get("greedy_agreement") if s.name == "default" else None
        rows.append(
            row(
                s,
                device,
                "onnxruntime",
                variant,
                "classify",
                CLASSIFY_BATCH,
                seconds,
                base,
                agreement,
                None,
                len(passages),
            )
        )
    return rows


def row(
    s: Subject,
    device: str,
    engine: str,
    variant: str,
    task: str,
    batch: int,
    seconds: float,
    base: float,
    agreement: float | None,
    same_tokens: float | None,
    n_rows: int | None = None,
) -> dict:
    r = {
        "model": s.name,
        "device": device,
        "engine": engine,
        "variant": variant,
        "task": task,
        "batch": batch,
        "seconds": round(seconds, 3),
        "speedup_vs_torch": round(base / seconds, 3),
        "greedy_agreement": agreement,
        "generated_tokens_equal": same_tokens,
    }
    if task == "generate":
        r |= {"tokens_per_s": round(batch * NEW / seconds, 1), "ms_per_token": round(1000 * seconds / NEW, 2)}
    else:
        r |= {
            "rows_per_s": round(n_rows / seconds, 1),
            "tokens_per_s": round(n_rows * s.prompts.shape[1] / seconds, 1),
            "ms_per_token": None,
        }
    return r


def print_table(rows: list[dict]) -> None:
    head = (
        f"{'model':10} {'device':6} {'engine':11} {'variant':13} {'task':8} {'batch':>5} {'tok/s':>9} "
        f"{'ms/tok':>8} {'rows/s':>8} {'speedup':>8} {'agree':>7} {'same':>6}"
    )
    print(head)
    print("-" * len(head))
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for r in rows:
        print(
            f"{r['model']:10} {r['device']:6} {r['engine']:11} {r['variant']:13} {r['task']:8} {r['batch']:>5} "
            f"{fmt(r['tokens_per_s'], '9.1f')} {fmt(r['ms_per_token'], '8.2f')} {fmt(r.get('rows_per_s'), '8.1f')} "
            f"{fmt(r['speedup_vs_torch'], '7.2f')}x {fmt(r['greedy_agreement'], '7.4f')} "
            f"{fmt(r['generated_tokens_equal'], '6.3f')}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("gptcore-work"), help="a pipeline work directory (default LM)")
    p.add_argument("--models", nargs="+", default=["default", "gpt2-124m"], choices=["default", "gpt2-124m"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, help="threads for both engines (default: torch's and ONNX Runtime's own)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per measurement; the best counts")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    build = {"default": default_subject, "gpt2-124m": gpt2_subject}
    rows = []
    with tempfile.TemporaryDirectory(prefix="gptcore-bench-") as tmp:
        for name in args.models:
            start = time.perf_counter()
            subject = build[name](args.workdir, Path(tmp))
            print(f"{name}: packages built in {time.perf_counter() - start:.0f}s", flush=True)
            rows += bench_subject(subject, args.device, args.threads, args.repeats)
            del subject
    print_table(rows)
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()
