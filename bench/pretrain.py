"""Pretraining throughput: gptcore's training step against a plain eager fp32 PyTorch model.

    python bench/pretrain.py --preset tiny --device cpu --steps 30 [--context 256 --batch 16
                             --vocab 8192] [--json out.json]

Both train the same shape (layers, width, heads, context, vocabulary) on random tokens. gptcore
runs as the preset configures it (bf16 autocast and fused AdamW on CUDA, torch.compile where the
preset asks); the reference is `nn.TransformerEncoder` (pre-LN, GELU, causal mask) in fp32 with
a default AdamW. A preset that trains the recommended recipe (`default`) is also timed with the
GPT-2 recipe (`default-gpt2`), for the recipe's step time against GPT-2's. Each runs in a fresh
process, so peak memory belongs to one model alone. Prints tokens/s, MFU (where the device's
peak is known or --peak-tflops given) and peak memory. --context, --batch and --vocab override
the preset's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import write_json  # bench/machine.py: the machine beside the figures

from gptcore.config import ModelConfig
from gptcore.model import GPT
from gptcore.presets import PRESETS
from gptcore.train.loop import autocast, enable_tf32
from gptcore.train.optim import configure_optimizers
from gptcore.train.perf import peak_flops, peak_memory_bytes


class ReferenceGPT(nn.Module):
    """The same shape from stock PyTorch modules: what a user would write without gptcore."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        layer = nn.TransformerEncoderLayer(
            cfg.n_embd, cfg.n_head, 4 * cfg.n_embd, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, cfg.n_layer, enable_nested_tensor=False)
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor):
        T = idx.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=idx.device)
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        logits = self.lm_head(self.ln_f(self.blocks(x, mask=mask, is_causal=True)))
        return logits, nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def measure(which: str, args: argparse.Namespace, device: torch.device) -> dict:
    cfg = PRESETS[f"{args.preset}-gpt2" if which == "gpt2" else args.preset]()
    model_cfg = dataclasses.replace(
        cfg.model,
        vocab_size=args.vocab or cfg.tokenizer.vocab_size,
        block_size=args.context or cfg.model.block_size,
    )
    B, T, V = args.batch or cfg.pretrain.batch_size, model_cfg.block_size, model_cfg.vocab_size
    torch.manual_seed(0)
    if which != "reference":
        enable_tf32(device)
        model = GPT(model_cfg).to(device)
        optimizer = configure_optimizers(model, cfg.pretrain, device)
        forward = torch.compile(model) if cfg.pretrain.compile else model
        context = lambda: autocast(device)  # noqa: E731
    else:
        model = ReferenceGPT(model_cfg).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain.lr)
        forward, context = model, torch.enable_grad
    x = torch.randint(0, V, (B, T), device=device)
    y = torch.randint(0, V, (B, T), device=device)

    def step() -> None:
        optimizer.zero_grad()
        with context():
            _, loss = forward(x, targets=y)
        loss.backward()
        optimizer.step()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t = time.perf_counter()
    for _ in range(args.warmup):  # includes torch.compile's compilation
        step()
    sync()
    warmup_s = time.perf_counter() - t
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = time.perf_counter() - t
    tokens_per_s = args.steps * B * T / seconds
    peak = peak_flops(device, args.peak_tflops)
    flops = GPT(model_cfg).flops_per_token() if which == "reference" else model.flops_per_token()
    return {
        "tokens_per_s": tokens_per_s,
        "mfu": flops * tokens_per_s / peak if peak else None,
        "peak_mem_bytes": peak_memory_bytes(device),
        "warmup_s": warmup_s,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for MFU where it is not known")
    p.add_argument("--context", type=int, help="context length (default: the preset's)")
    p.add_argument("--batch", type=int, help="batch size (default: the preset's)")
    p.add_argument("--vocab", type=int, help="vocabulary size (default: the preset's tokenizer's)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--only", choices=["gptcore", "gpt2", "reference"], help=argparse.SUPPRESS)  # a child process's side
    args = p.parse_args()
    device = torch.device(args.device)
    if args.only:
        print(json.dumps(measure(args.only, args, device)))
        return
    sides = ["gptcore", "reference"] + (["gpt2"] if f"{args.preset}-gpt2" in PRESETS else [])
    results = {}
    for which in sides:
        child = [sys.executable, __file__, "--only", which] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if v is not None and k not in ("only", "json")
        ]
        out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
        results[which] = json.loads(out.strip().splitlines()[-1])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    g, r = results["gptcore"], results["reference"]
    summary = {
        "device": name,
        "preset": args.preset,
        "context": args.context,
        "batch": args.batch,
        "vocab": args.vocab,
        "steps": args.steps,
        "tokens_per_s": g["tokens_per_s"],
        "mfu": g["mfu"],
        "peak_mem_bytes": g["peak_mem_bytes"],
        "reference_tokens_per_s": r["tokens_per_s"],
        "reference_mfu": r["mfu"],
        "reference_peak_mem_bytes": r["peak_mem_bytes"],
        "speedup": g["tokens_per_s"] / r["tokens_per_s"],
        "warmup_s": g["warmup_s"],
    }
    if "gpt2" in results:  # step time is inverse to tokens/s at one shape
        summary["gpt2_tokens_per_s"] = results["gpt2"]["tokens_per_s"]
        summary["step_time_vs_gpt2"] = results["gpt2"]["tokens_per_s"] / g["tokens_per_s"]
    mfu = lambda v: "n/a (peak unknown)" if v is None else f"{v:.1%}"  # noqa: E731
    print(f"device {name}, preset {args.preset}, {args.steps} timed steps")
    print(
        f"  gptcore    {g['tokens_per_s']:>12,.0f} tokens/s  MFU {mfu(g['mfu'])}  "
        f"peak memory {g['peak_mem_bytes'] / 2**20:,.0f} MiB"
    )
    print(
        f"  reference  {r['tokens_per_s']:>12,.0f} tokens/s  MFU {mfu(r['mfu'])}  "
        f"peak memory {r['peak_mem_bytes'] / 2**20:,.0f} MiB"
    )
    print(f"  speedup    {summary['speedup']:.2f}x")
    if "gpt2" in results:
        print(f"  GPT-2 recipe ({args.preset}-gpt2) {summary['gpt2_tokens_per_s']:>8,.0f} tokens/s")
        print(f"  recipe / GPT-2 step time {summary['step_time_vs_gpt2']:.2f}x")
    if args.json:
        write_json(args.json, summary)


if __name__ == "__main__":
    main()
