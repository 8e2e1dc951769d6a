"""Compression's Pareto table: the pretrained LM against its pruned, distilled and from-scratch students.

    python bench/compress.py [--workdir gptcore-work] [--steps N] [--fractions 0.75 0.5]
                             [--device cpu] [--rounds 5] [--out DIR] [--json rows.json]

On a pipeline work directory (`gptcore pipeline --workdir DIR`, or its ingest, tokenizer and
pretrain verbs), in one run: the compress stage (`gptcore.train.compress`) at each fraction, with
the from-scratch students (`compress.scratch`), recovery for --steps (default: the preset's);
then for the teacher and every student, through the pipeline's own evaluation and export:
- parameters, ONNX size of the fp32 package graph and of its int8 variant;
- ORT greedy decode tokens/s at batch 1 and 16 (PROMPT prompt tokens, NEW new tokens per row,
  the fp32 package; the median of --rounds, every model timed once a round, in turns);
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
from machine import write_json  # bench/machine.py: the machine beside the figures

from gptcore.eval.lm import evaluate_lm
from gptcore.export.lm import export_lm_onnx
from gptcore.export.variants import VARIANT_FILES
from gptcore.layout import DOC_BPB_FILE, RESULT_FILE, Workdir
from gptcore.logs import console_logging
from gptcore.metrics import paired_bpb_bootstrap
from gptcore.presets import load_config
from gptcore.results import (
    CompressResult,
    load_compressed,
    load_pretrained,
    load_tokenized,
    read_doc_scores,
    read_tokens,
)
from gptcore.runtime import load_model
from gptcore.train.compress import compress

# Decoding mostly (16 prompt tokens, 112 new: the default context of 128 whole), so the figure is
# the per-token cost the student cuts, not the prefill's.
PROMPT, NEW, BATCHES = 16, 112, (1, 16)
MODEL_NAMES = {"prune+distill": "pruned_distilled", "prune": "pruned", "scratch": "scratch"}


def decode_tokens_per_s(packages: dict[str, Path], prompts: np.ndarray, device: str, rounds: int) -> dict:
    """name -> {batch: greedy decode tokens/s}: the median of `rounds` rounds, each timing every
    package once in turn after a warm-up, so the machine's drift during the run falls on all alike."""
    lms = {name: load_model(package, device=device, variant="fp32") for name, package in packages.items()}
    speeds: dict[str, dict[int, float]] = {name: {} for name in lms}
    for batch in BATCHES:
        rows = prompts[:batch].tolist()
        seconds: dict[str, list[float]] = {name: [] for name in lms}
        for lm in lms.values():
            lm.generate_batch_ids(rows, 4, temperature=0.0, stop_at_eos=False)
        for _ in range(rounds):
            for name, lm in lms.items():
                start = time.perf_counter()
                lm.generate_batch_ids(rows, NEW, temperature=0.0, stop_at_eos=False)
                seconds[name].append(time.perf_counter() - start)
        for name in lms:
            speeds[name][batch] = batch * NEW / float(np.median(seconds[name]))
    return speeds


def measure(name: str, model_dir: Path, w: Workdir, out: Path, cfg) -> dict:
    """Evaluate and export one model as the pipeline does: its size and its per-document scores."""
    start = time.perf_counter()
    evaluation = evaluate_lm(cfg.evaluate, model_dir, w.tokenizer, out / "eval" / name, data_dir=w.data)
    export_cfg = dataclasses.replace(cfg.export, variants=["int8"])
    pkg = Path(export_lm_onnx(export_cfg, model_dir, w.tokenizer, out / "export" / name).package_dir)
    int8 = pkg / VARIANT_FILES["int8"]
    print(f"{name}: evaluated and exported in {time.perf_counter() - start:.0f}s", flush=True)
    return {
        "num_params": load_pretrained(model_dir).num_params,
        "onnx_bytes_fp32": (pkg / VARIANT_FILES["fp32"]).stat().st_size,
        "onnx_bytes_int8": int8.stat().st_size if int8.exists() else None,
        "test_bpb": evaluation.test["bpb"],
        "doc_scores": read_doc_scores(out / "eval" / name / DOC_BPB_FILE),
        "package": pkg,
    }


def students(compress_cfg, w: Workdir, out: Path) -> CompressResult:
    """The compress stage's students: those already in --out when made with these settings, else made now."""
    done = out / "compress" / RESULT_FILE
    if done.exists():
        result = load_compressed(out / "compress")
        made = {(s.target_fraction, s.steps) for s in result.students if s.recipe != "prune"}
        wanted = {(f, compress_cfg.max_steps) for f in compress_cfg.fractions}
        if made == wanted and len(result.students) == 3 * len(wanted):
            print(f"compress: the students in {out / 'compress'} are reused", flush=True)
            return result
    start = time.perf_counter()
    result = compress(compress_cfg, w.pretrain, w.tokenizer, out / "compress")
    print(f"compress: {len(result.students)} students in {time.perf_counter() - start:.0f}s", flush=True)
    return result


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
    result = students(compress_cfg, w, out)
    teacher = measure("teacher", w.pretrain, w, out, cfg)
    rows = [{"model": "teacher", "student": None, "param_fraction": 1.0, **teacher}]
    for s in result.students:
        figures = measure(s.name, Path(s.out_dir), w, out, cfg)
        rows.append({"model": MODEL_NAMES[s.recipe], "student": s.name, "param_fraction": s.param_fraction, **figures})
    val = np.asarray(read_tokens(load_tokenized(w.tokenizer), "val"))
    packages = {r["student"] or "teacher": r.pop("package") for r in rows}
    speeds = decode_tokens_per_s(packages, val[: 16 * PROMPT].reshape(16, PROMPT), args.device, args.rounds)
    for r in rows:
        for batch in BATCHES:
            r[f"decode_tokens_per_s_batch{batch}"] = speeds[r["student"] or "teacher"][batch]
    t = teacher["doc_scores"]
    for r in rows:
        d = r["doc_scores"]
        assert np.array_equal(d.doc_ids, t.doc_ids), "teacher and student scored other test documents"
        paired = paired_bpb_bootstrap(t.nats, d.nats, t.bytes)
        r["bpb_ratio"], (r["bpb_ratio_ci_low"], r["bpb_ratio_ci_high"]) = (
            paired["ratio"]["value"],
            paired["ratio"]["ci"],
        )
        for batch in BATCHES:
            r[f"decode_speedup_batch{batch}"] = (
                r[f"decode_tokens_per_s_batch{batch}"] / rows[0][f"decode_tokens_per_s_batch{batch}"]
            )
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
    p.add_argument("--rounds", type=int, default=5, help="timed decodes of each model, in turns; the median counts")
    p.add_argument(
        "--out",
        type=Path,
        help="keep the students, evaluations and packages here, and reuse its students (default: a temp dir)",
    )
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
