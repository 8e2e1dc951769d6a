"""The KV cache change measured on its own: one decode step's time against the context it attends
to, with the growing cache (format 2: past (B, H, P, D) concatenated into a new present
(B, H, P + 1, D) every step) and with the fixed cache written in place (format 3: one slot
written in a (B, H, W, D) buffer bound as both past and present).

    python bench/kv_cache.py [--workdir gptcore-work] [--models default gpt2-124m] [--device cpu]
                             [--threads N] [--batches 1 16] [--steps 8] [--json rows.json]

Both graphs are exported in the same run from the same weights (fp32, fused, parity-checked
like any package): `default`, the trained LM of a pipeline work directory (`gptcore pipeline
--workdir DIR` first), and `gpt2-124m`, GPT-2 small's shape with random weights (its tokenizer
is the work directory's; the bench feeds token ids). For each batch and context length
(64 ... 1024, capped at the model's block_size; the step's own token included) the cache is
set at that length and `--steps` steps are timed: the median counts. A step is the graph call
the runtime makes for one decoding token per row, bound as it binds it: the growing graph's
through `GrowingCache`, as `OnnxLM.rows_growing` does; the fixed one's through `DecodeBatch.run`,
at the width the engine would hold (`gptcore.runtime.kv.cache_width`).

The caches hold zeros rather than a real prefill: a step's cost does not depend on what its
slots hold (dense kernels, no data-dependent paths), and prefilling 16 x 1024 tokens of
gpt2-124m costs minutes on a 2-core CPU. `serve_load.py` imports the package helpers here.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import write_json  # bench/machine.py: the machine beside the figures

from gptcore.config import ExportConfig
from gptcore.export.lm import check_lm_parity, export_lm_graph
from gptcore.export.package import write_package
from gptcore.layout import TOKENIZER_FILE, Workdir
from gptcore.model import GPT
from gptcore.presets import gpt2_124m
from gptcore.results import load_pretrained, load_tokenized, load_tokenizer, read_tokens
from gptcore.runtime import load_model
from gptcore.runtime.batching import DecodeBatch
from gptcore.runtime.kv import GrowingCache, cache_width
from gptcore.weights import load_lm

CONTEXTS = (64, 128, 256, 512, 1024)
WARMUP_STEPS = 2  # untimed steps per point: the first calls at a new shape pay for allocations


@dataclasses.dataclass
class Source:
    """What an LM package is exported from: the weights, a tokenizer, the description, parity text."""

    name: str
    gpt: GPT
    tok: Any  # tokenizers.Tokenizer
    tokenizer_json: Path
    meta: dict
    val: np.ndarray  # token ids the parity check reads


def load_source(name: str, workdir: Path) -> Source:
    """`default`: the work directory's pretrained LM; `gpt2-124m`: GPT-2 small's shape, random weights."""
    w = Workdir(workdir)
    if not (w.tokenizer / TOKENIZER_FILE).is_file():
        sys.exit(f"{workdir}: no tokenizer; run `gptcore pipeline --workdir {workdir}` first")
    tok = load_tokenizer(w.tokenizer)
    if name == "default":
        if not (w.pretrain / "result.json").is_file():
            sys.exit(f"{workdir}: no pretrained LM; run `gptcore pipeline --workdir {workdir}` first")
        gpt, meta = load_lm(load_pretrained(w.pretrain).best_dir)
        val = np.asarray(read_tokens(load_tokenized(w.tokenizer), "val"), dtype=np.int64)
        return Source(name, gpt, tok, w.tokenizer / TOKENIZER_FILE, meta, val)
    torch.manual_seed(0)
    preset = gpt2_124m()
    gpt = GPT(dataclasses.replace(preset.model, vocab_size=preset.tokenizer.vocab_size)).eval()
    meta = {"model": dataclasses.asdict(gpt.cfg), "data_digest": "random-weights", "tokenizer_digest": "none"}
    # One context window for the parity check: with random weights it checks the graph, not the model.
    val = np.random.default_rng(1).integers(0, gpt.cfg.vocab_size, gpt.cfg.block_size + 16)
    return Source(name, gpt, tok, w.tokenizer / TOKENIZER_FILE, meta, val)


def lm_package(src: Source, out: Path, fixed_cache: bool = True) -> Path:
    """The fp32 LM package of `src` in `out` (fused, parity-checked), with either cache layout."""
    # fp32 alone: the variants would double the export time and the comparison is between layouts.
    cfg = ExportConfig(variants=[])
    write_package(
        out,
        "lm",
        lambda path: export_lm_graph(src.gpt, path, cfg.opset, fixed_cache=fixed_cache),
        src.gpt,
        src.tok,
        src.tokenizer_json,
        src.meta | {"labels": []},
        cfg,
        functools.partial(check_lm_parity, src.gpt, src.val, cfg),
    )
    return out


def growing_step(lm, batch: int, context: int) -> Callable[[], None]:
    """One step on the growing graph: a past of context - 1 positions, concatenated into a present of context."""
    cache = GrowingCache(lm, batch, context)
    zeros = np.zeros(batch * lm.n_head * context * lm.head_dim, dtype=lm.cache_dtype)
    for buffer in (b for pair in cache.buffers for b in pair):  # uninitialised: NaNs or denormals would run slow
        buffer.update_inplace(zeros)
    cache.past = context - 1
    feed = {
        "input_ids": np.zeros((batch, 1), dtype=np.int64),
        "position_ids": np.full((batch, 1), context - 1, dtype=np.int64),
        "attention_mask": np.ones((batch, context), dtype=np.int64),
        "logit_positions": np.zeros((batch, 1), dtype=np.int64),
    }
    binding = lm.session.io_binding()

    def step() -> None:
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name, value in feed.items():
            binding.bind_cpu_input(name, value)
        binding.bind_output("logits", lm.device_type, lm.device_id)
        cache.bind(binding, 1)  # no advance: every timed step concatenates onto the same past
        lm.session.run_with_iobinding(binding)
        binding.get_outputs()[0].numpy()  # the logits to the host, as decoding needs them

    return step


def in_place_step(lm, batch: int, context: int) -> Callable[[], None]:
    """One step on the fixed graph: each row writes slot context - 1 of a cache_width(context) wide buffer."""
    decode = DecodeBatch(lm, max_rows=batch)
    decode.reserve(batch, context)  # cache_width(context) slots, as the engine holds them; a new SlotCache is zeros
    ids = np.zeros((batch, 1), dtype=np.int64)
    positions = np.full((batch, 1), context - 1, dtype=np.int64)
    return lambda: decode.run(0, ids, positions)


def median_ms(steps: dict[str, Callable[[], None]], n: int) -> dict[str, float]:
    """Each step's median time in ms over `n` timed calls, the steps taking turns: drift in the
    machine's speed (other work on a shared CPU) then hits every step alike."""
    for step in steps.values():
        for _ in range(WARMUP_STEPS):
            step()
    times = {name: [] for name in steps}
    for _ in range(n):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def bench_model(src: Source, out: Path, device: str, threads: int | None, batches: list[int], steps: int) -> list[dict]:
    start = time.perf_counter()
    packages = {"growing": lm_package(src, out / "growing", False), "in-place": lm_package(src, out / "in-place")}
    print(f"{src.name}: packages built in {time.perf_counter() - start:.0f}s", flush=True)
    lms = {cache: load_model(path, device=device, threads=threads, variant="fp32") for cache, path in packages.items()}
    assert not lms["growing"].fixed_cache and lms["in-place"].fixed_cache
    makers = {"growing": growing_step, "in-place": in_place_step}
    contexts = sorted({min(c, src.gpt.cfg.block_size) for c in CONTEXTS})
    rows = []
    for batch in batches:
        for context in contexts:
            ms = median_ms({cache: makers[cache](lm, batch, context) for cache, lm in lms.items()}, steps)
            for cache, value in ms.items():
                rows.append(
                    {
                        "model": src.name,
                        "device": device,
                        "cache": cache,
                        "batch": batch,
                        "context": context,
                        # slots a step attends over: the fixed cache's width rounds the context up
                        "slots": context if cache == "growing" else cache_width(context, src.gpt.cfg.block_size),
                        "ms_per_step": round(value, 3),
                        "tokens_per_s": round(1000 * batch / value, 1),
                        "speedup_vs_growing": round(ms["growing"] / value, 3),
                    }
                )
            print(
                f"  batch {batch:>3} context {context:>5}: growing {ms['growing']:8.2f} ms, "
                f"in-place {ms['in-place']:8.2f} ms",
                flush=True,
            )
    return rows


def print_table(rows: list[dict]) -> None:
    head = (
        f"{'model':10} {'cache':9} {'batch':>5} {'context':>7} {'slots':>5} {'ms/step':>9} {'tok/s':>9} {'speedup':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['model']:10} {r['cache']:9} {r['batch']:>5} {r['context']:>7} {r['slots']:>5} "
            f"{r['ms_per_step']:>9.2f} {r['tokens_per_s']:>9.1f} {r['speedup_vs_growing']:>7.2f}x"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("gptcore-work"), help="a pipeline work directory")
    p.add_argument("--models", nargs="+", default=["default", "gpt2-124m"], choices=["default", "gpt2-124m"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, help="ONNX Runtime's intra-op threads (default: all cores)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="rows decoding together")
    p.add_argument("--steps", type=int, default=8, help="timed steps per point; the median counts")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="gptcore-bench-kv-") as tmp:
        for name in args.models:
            rows += bench_model(
                load_source(name, args.workdir), Path(tmp) / name, args.device, args.threads, args.batches, args.steps
            )
    print_table(rows)
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()
