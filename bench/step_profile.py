"""Where a training step's time goes: the GPT-2 recipe against the recommended one, part by part.

    python bench/step_profile.py [--layers 4 --heads 4 --width 128 --context 256 --batch 16
                                  --vocab 8192] [--steps 5] [--device cpu] [--json out.json]

In one process, on one shape, each timed as the mean of `--steps` runs after a warm-up:
- the whole step of each recipe split into forward (with the loss), backward and optimizer step;
- each part the recipe swaps, alone, forward + backward at the shape it runs at, times the number
  of times a step runs it: RMSNorm against LayerNorm, rotary on q and k, QK-norm, squared ReLU
  against GELU; and the optimizer step of the block matrices, AdamW against Muon orthogonalising
  in bf16 and in fp32 (the trainer takes `orthogonalisation_dtype`: bf16 where matmuls run it
  natively). `ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2` runs it as a CPU with AVX2 only.
The recipe is `gptcore.presets.RECOMMENDED_MODEL` (rotary, RMSNorm, QK-norm, squared ReLU, untied head, Muon).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import write_json  # bench/machine.py: the machine beside the figures

from gptcore.config import ModelConfig, TrainConfig
from gptcore.model import GPT, apply_rope, rope_angles
from gptcore.presets import RECOMMENDED_MODEL
from gptcore.train.optim import Muon, configure_optimizers, orthogonalisation_dtype


def timed(fn, steps: int, sync) -> float:
    """Mean seconds of `fn()` over `steps` calls, after one warm-up call."""
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - start) / steps


def whole_step(cfg: ModelConfig, train: TrainConfig, batch: int, device, steps: int, sync) -> dict[str, float]:
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    optimizers = configure_optimizers(model, train, device)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=device)
    y = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=device)
    state = {}

    def forward():
        optimizers.zero_grad()
        state["loss"] = model(x, targets=y)[1]

    def backward():
        forward()
        state["loss"].backward()

    def step():
        backward()
        optimizers.step()

    f, fb, fbo = (timed(fn, steps, sync) for fn in (forward, backward, step))
    return {"forward_s": f, "backward_s": fb - f, "optimizer_s": fbo - fb, "step_s": fbo}


def forward_backward(module_fn, shape, device, steps: int, sync) -> float:
    x = torch.randn(*shape, device=device, requires_grad=True)

    def run():
        module_fn(x).sum().backward()

    return timed(run, steps, sync)


def parts(cfg: ModelConfig, batch: int, device, steps: int, sync) -> dict[str, float]:
    """Seconds per training step each swapped part costs, forward + backward (optimizer: step)."""
    B, T, C, H, L = batch, cfg.block_size, cfg.n_embd, cfg.n_head, cfg.n_layer
    D = C // H
    norms = 2 * L + 1
    rope = rope_angles(torch.arange(T, device=device).expand(B, T), D)
    layer, rms, rms_d = nn.LayerNorm(C).to(device), nn.RMSNorm(C).to(device), nn.RMSNorm(D).to(device)
    out = {
        "layernorm_s": norms * forward_backward(layer, (B, T, C), device, steps, sync),
        "rmsnorm_s": norms * forward_backward(rms, (B, T, C), device, steps, sync),
        "rope_qk_s": 2 * L * forward_backward(lambda q: apply_rope(q, rope), (B, H, T, D), device, steps, sync),
        "qk_norm_s": 2 * L * forward_backward(rms_d, (B, T, H, D), device, steps, sync),
        "gelu_s": L * forward_backward(lambda h: F.gelu(h, approximate="tanh"), (B, T, 4 * C), device, steps, sync),
        "relu2_s": L * forward_backward(lambda h: F.relu(h).square(), (B, T, 4 * C), device, steps, sync),
    }
    for optimizer in ("adamw", "muon_bf16", "muon_fp32"):
        torch.manual_seed(0)
        model = GPT(cfg).to(device)
        blocks = [p for name, p in model.named_parameters() if p.dim() == 2 and name.startswith("blocks.")]
        for p in blocks:
            p.grad = torch.randn_like(p)
        if optimizer == "adamw":
            opt = torch.optim.AdamW(blocks, lr=1e-3, fused=device.type == "cuda")
        else:
            dtype = torch.bfloat16 if optimizer == "muon_bf16" else torch.float32
            opt = Muon(blocks, lr=0.02, weight_decay=0.1, ns_dtype=dtype)
        out[f"{optimizer}_blocks_s"] = timed(opt.step, steps, sync)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    base = ModelConfig(
        block_size=args.context, n_layer=args.layers, n_head=args.heads, n_embd=args.width, vocab_size=args.vocab
    )
    recipes = {
        "gpt2": (base, TrainConfig()),
        "recipe": (dataclasses.replace(base, **RECOMMENDED_MODEL), TrainConfig(optimizer="muon")),
    }
    shape = f"{args.layers}x{args.width}, {args.heads} heads, context {args.context}, batch {args.batch}"
    ns_dtype = str(orthogonalisation_dtype(device)).removeprefix("torch.")
    print(f"{shape}, vocabulary {args.vocab}, {device}, {torch.get_num_threads()} threads, Muon in {ns_dtype}")
    rows = {
        name: whole_step(cfg, train, args.batch, device, args.steps, sync) for name, (cfg, train) in recipes.items()
    }
    for name, r in rows.items():
        print(
            f"  {name:7} step {r['step_s']:.3f} s = forward {r['forward_s']:.3f} + backward {r['backward_s']:.3f}"
            f" + optimizer {r['optimizer_s']:.3f}"
        )
    print(f"  recipe / gpt2 step time: {rows['recipe']['step_s'] / rows['gpt2']['step_s']:.2f}x")
    swapped = parts(base, args.batch, device, args.steps, sync)
    print("  parts, seconds per step (forward + backward; the optimizer's step):")
    for key, seconds in swapped.items():
        print(f"    {key.removesuffix('_s'):14} {seconds:.4f}")
    if args.json:
        shape_args = {k: v for k, v in vars(args).items() if k != "json"}
        write_json(args.json, {"shape": shape_args, "muon_dtype": ns_dtype, "steps": rows, "parts": swapped})


if __name__ == "__main__":
    main()
