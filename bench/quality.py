"""Loss per second: the GPT-2 recipe against gptcore's recommended recipe, at equal wall-clock.

    python bench/quality.py --preset tiny --budget 30 [--json out.json]

The recipe is `gptcore.presets.recommended` (what the default preset trains); the baseline is
the preset's GPT-2 recipe (`default-gpt2` for `default`). Both train on the same token shards
(Shakespeare, the preset's tokenizer) on this machine for the same wall-clock budget
(`pretrain.time_budget_s`: each run fits its steps to the budget from its step time, again at
every log step, so its learning-rate schedule completes inside it). Prints the val bits per
byte each reaches and their ratio (recipe / baseline; below 1 is better).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import write_json  # bench/machine.py: the machine beside the figures

from gptcore.config import EvalConfig, ModelConfig, TrainConfig
from gptcore.data.ingest import ingest
from gptcore.data.tokenizer import train_tokenizer
from gptcore.eval.lm import evaluate_lm
from gptcore.presets import PRESETS, RECOMMENDED_LR_SCALE, RECOMMENDED_MODEL, recommended
from gptcore.train.pretrain import pretrain


def train_for(budget_s: float, model: ModelConfig, train: TrainConfig, tokens: Path, out: Path) -> tuple[int, float]:
    """Pretrain for `budget_s` seconds of training (pretrain.time_budget_s); return (steps, seconds)."""
    run = dataclasses.replace(
        train,
        max_steps=1_000_000,
        time_budget_s=budget_s,
        eval_interval=1_000_000,
        checkpoint_interval=1_000_000,
        log_interval=100,
    )
    result = pretrain(model, run, tokens, out / "run")
    return result.steps, result.train_seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--budget", type=float, default=30.0, help="training seconds per recipe")
    p.add_argument("--workdir", type=Path, help="keep the runs here (default: a temporary directory)")
    p.add_argument(
        "--recipe-optimizer",
        default="muon",
        choices=["adamw", "muon"],
        help="the recipe's optimizer for the block matrices (the baseline keeps AdamW)",
    )
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    # the baseline is the preset's GPT-2 recipe: `default` trains the recommended one itself
    cfg = PRESETS.get(f"{args.preset}-gpt2", PRESETS[args.preset])()
    best = recommended(cfg)  # refuses a preset that is not the GPT-2 recipe, before any work
    root = args.workdir or Path(tempfile.mkdtemp(prefix="gptcore-quality-"))
    if not (root / "tokenizer" / "tokens.json").is_file():
        ingest(cfg.ingest, root / "data")
        train_tokenizer(cfg.tokenizer, root / "data", root / "tokenizer")
    recipes = {
        "baseline": (cfg.model, cfg.pretrain),
        "recipe": (best.model, dataclasses.replace(best.pretrain, optimizer=args.recipe_optimizer)),
    }
    figures = {}
    for name, (model, train) in recipes.items():
        steps, seconds = train_for(args.budget, model, train, root / "tokenizer", root / name)
        lm = evaluate_lm(
            EvalConfig(prompts=["ROMEO."], max_new_tokens=1),
            root / name / "run",
            root / "tokenizer",
            root / name / "eval",
        )
        figures[name] = {"val_bpb": lm.val["bpb"], "steps": steps, "train_s": seconds}
        print(f"{name:>8}: val {lm.val['bpb']:.4f} bits/byte after {steps} steps in {seconds:.1f} s")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    summary = {
        "device": device,
        "preset": args.preset,
        "budget_s": args.budget,
        "baseline_bpb": figures["baseline"]["val_bpb"],
        "recipe_bpb": figures["recipe"]["val_bpb"],
        "ratio": figures["recipe"]["val_bpb"] / figures["baseline"]["val_bpb"],
        "recipe": RECOMMENDED_MODEL,
        "recipe_lr_scale": RECOMMENDED_LR_SCALE,
        "recipe_optimizer": args.recipe_optimizer,
        "runs": figures,
    }
    print(f"ratio recipe/baseline: {summary['ratio']:.3f} on {device}")
    if args.json:
        write_json(args.json, summary)


if __name__ == "__main__":
    main()
