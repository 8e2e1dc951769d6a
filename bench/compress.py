"""Compression's Pareto table: the pretrained LM against its pruned, distilled and from-scratch students.

    python bench/compress.py [--workdir gptcore-work] [--steps N] [--fractions 0.75 0.5]
                             [--device cpu] [--json rows.json]

On a pipeline work directory (`gptcore pipeline --workdir DIR`, or its ingest, tokenizer and
pretrain verbs), in one run: the compress stage (`gptcore.train.compress`) at each fraction, with
the from-scratch students (`compress.scratch`), recovery for --steps (default: the preset's);
then for the teacher and every student, through the pipeline's own evaluation and export:
- parameters, ONNX size of the fp32 package graph and of its int8 variant;
- ORT greedy decode tokens/s at batch 1 and 16 (PROMPT prompt tokens, NEW new tokens per row);
- test bits/byte, and the student's over the teacher's with its paired 95% interval (the same
  test documents, resampled together: `gptcore.metrics.paired_bpb_bootstrap`);
- for each distilled student, its paired interval against the same-shape student from scratch
  (the reduction in bits/byte the teacher bought: above zero is a win).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from inference import timed  # bench/inference.py: best of N after a warm-up
from machine import write_json  # bench/machine.py: the machine beside the figures

from gptcore.eval.lm import evaluate_lm
from gptcore.export.lm import export_lm_onnx
from gptcore.export.variants import VARIANT_FILES
from gptcore.layout import DOC_BPB_FILE, Workdir
from gptcore.logs import console_logging
from gptcore.metrics import paired_bpb_bootstrap
from gptcore.presets import load_config
from gptcore.results import load_pretrained, load_tokenized, read_doc_scores, read_tokens
from gptcore.runtime import load_model
from gptcore.train.compress import compress

PROMPT, NEW, BATCHES = 64, 64, (1, 16)
MODEL_NAMES = {"prune+distill": "pruned_distilled", "prune": "pruned", "scratch": "scratch"}


def decode_tokens_per_s(package: Path, prompts: np.ndarray, device: str, repeats: int) -> dict[int, float]:
    lm = load_model(package, device=device, variant="fp32")
    speeds = {}
    for batch in BATCHES:
        rows = prompts[:batch].tolist()

        def run(warmup: bool, rows=rows):
            return lm.generate_batch_ids(rows, 4 if warmup else NEW, temperature=0.0, stop_at_eos=False)

        seconds, _ = timed(run, repeats)
        speeds[batch] = batch * NEW / seconds
    return speeds


def measure(name: str, model_dir: Path, w: Workdir, out: Path, cfg, device: str, repeats: int) -> dict:
    """Evaluate and export one model as the pipeline does; its size, speed and per-document scores."""
    start = time.perf_counter()
    evaluation = evaluate_lm(cfg.evaluate, model_dir, w.tokenizer, out / "eval" / name, data_dir=w.data)
    export_cfg = dataclasses.replace(cfg.export, variants=["int8"])
    package = export_lm_onnx(export_cfg, model_dir, w.tokenizer, out / "export" / name)
    pkg = Path(package.package_dir)
    val = np.asarray(read_tokens(load_tokenized(w.tokenizer), "val"))
    prompts = val[: 16 * PROMPT].reshape(16, PROMPT)
    speeds = decode_tokens_per_s(pkg, prompts, device, repeats)
    int8 = pkg / VARIANT_FILES["int8"]
    print(f"{name}: measured in {time.perf_counter() - start:.0f}s", flush=True)
    return {
        "num_params": load_pretrained(model_dir).num_params,
        "onnx_bytes_fp32": (pkg / VARIANT_FILES["fp32"]).stat().st_size,
        "onnx_bytes_int8": int8.stat().st_size if int8.exists() else None,
        "decode_tokens_per_s_batch1": speeds[1],
        "decode_tokens_per_s_batch16": speeds[16],
        "test_bpb": evaluation.test["bpb"],
        "doc_scores": read_doc_scores(out / "eval" / name / DOC_BPB_FILE),
    }


def table(args, out: Path) -> list[dict]:
    w = Workdir(args.workdir)
    cfg = load_config(None, args.preset)
    compress_cfg = dataclasses.replace(
        cfg.compress,
        scratch=True,
        fractions=args.fractions,
        device=args.device,
        max_steps=args.steps or cfg.compress.max_steps,
    )
    start = time.perf_counter()
    result = compress(compress_cfg, w.pretrain, w.tokenizer, out / "compress")
    print(f"compress: {len(result.students)} students in {time.perf_counter() - start:.0f}s", flush=True)
    teacher = measure("teacher", w.pretrain, w, out, cfg, args.device, args.repeats)
    rows = [{"model": "teacher", "student": None, "param_fraction": 1.0, **teacher}]
    for s in result.students:
        figures = measure(s.name, Path(s.out_dir), w, out, cfg, args.device, args.repeats)
        rows.append({"model": MODEL_NAMES[s.recipe], "student": s.name, "param_fraction": s.param_fraction, **figures})
    t = teacher["doc_scores"]
    for r in rows:
        d = r["doc_scores"]
        assert np.array_equal(d.doc_ids, t.doc_ids), "teacher and student scored other test documents"
        paired = paired_bpb_bootstrap(t.nats, d.nats, t.bytes)
        r["bpb_ratio"], (r["bpb_ratio_ci_low"], r["bpb_ratio_ci_high"]) = (
            paired["ratio"]["value"],
            paired["ratio"]["ci"],
        )
        r["decode_speedup_batch1"] = r["decode_tokens_per_s_batch1"] / teacher["decode_tokens_per_s_batch1"]
        r["recovery_steps"] = 0 if r["model"] in ("teacher", "pruned") else compress_cfg.max_steps
    by_student = {r["student"]: r for r in rows}
    for r in rows:
        if r["model"] == "pruned_distilled":  # against the same shape from scratch, same steps and batches
            scratch = by_student[r["student"].replace("distilled", "scratch")]
            paired = paired_bpb_bootstrap(scratch["doc_scores"].nats, r["doc_scores"].nats, t.bytes)
            r["bpb_reduction_vs_scratch"] = paired["reduction"]["delta"]
            r["bpb_reduction_vs_scratch_ci_low"], r["bpb_reduction_vs_scratch_ci_high"] = paired["reduction"]["ci"]
    for r in rows:
        del r["doc_scores"]
    return rows


def print_table(rows: list[dict]) -> None:
    print(
        f"{'model':<17} {'student':<14} {'params':>9} {'share':>6} {'fp32 KB':>8} {'int8 KB':>8} "
        f"{'tok/s b1':>9} {'tok/s b16':>9} {'test bpb':>8} {'ratio [95% CI]':>22} {'vs scratch [95% CI]':>26}"
    )
    for r in rows:
        ratio = f"{r['bpb_ratio']:.4f} [{r['bpb_ratio_ci_low']:.4f}, {r['bpb_ratio_ci_high']:.4f}]"
        scratch = (
            f"{r['bpb_reduction_vs_scratch']:+.4f} [{r['bpb_reduction_vs_scratch_ci_low']:+.4f}, "
            f"{r['bpb_reduction_vs_scratch_ci_high']:+.4f}]"
            if "bpb_reduction_vs_scratch" in r
            else ""
        )
        int8 = f"{r['onnx_bytes_int8'] / 1024:8.0f}" if r["onnx_bytes_int8"] else f"{'-':>8}"
        print(
            f"{r['model']:<17} {r['student'] or '':<14} {r['num_params']:>9,} {r['param_fraction']:>6.2f} "
            f"{r['onnx_bytes_fp32'] / 1024:>8.0f} {int8} {r['decode_tokens_per_s_batch1']:>9.0f} "
            f"{r['decode_tokens_per_s_batch16']:>9.0f} {r['test_bpb']:>8.4f} {ratio:>22} {scratch:>26}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("gptcore-work"), help="a pipeline work directory")
    p.add_argument("--preset", default="default", help="the config the work directory was made with")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.75, 0.5], help="students' parameter shares")
    p.add_argument("--steps", type=int, help="recovery (and from-scratch) steps (default: the preset's compress)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=2, help="timed decodes per measurement; the best counts")
    p.add_argument("--out", type=Path, help="keep the students, evaluations and packages here (default: a temp dir)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args()
    console_logging()  # each stage's progress: recovery steps with their rate and ETA
    with tempfile.TemporaryDirectory(prefix="gptcore-compress-") as tmp:
        rows = table(args, args.out or Path(tmp))
    print_table(rows)
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()
