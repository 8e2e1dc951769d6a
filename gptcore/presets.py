"""Named configurations (presets) and loading a YAML or TOML file over one.

`load_config(path, preset)` starts from the preset, overrides the fields the file names, and
builds every dataclass again, so each override is type-checked and validated like a default;
errors name the file and field. Imports nothing heavy (no torch).
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from gptcore.config import (
    CompressConfig,
    EvalConfig,
    FinetuneConfig,
    ModelConfig,
    PipelineConfig,
    SFTConfig,
    TokenizerConfig,
    TrainConfig,
)
from gptcore.errors import ConfigError

# --- presets --------------------------------------------------------------------------------


# gptcore's recommended recipe for small models: rotary positions, RMSNorm, QK-norm, squared
# ReLU and an untied head, with Muon for the blocks' matrices (muon_lr) and AdamW for the rest
# (embedding, head, norms, biases) at 8x the GPT-2 recipe's learning rate: on the default
# preset's 300-s budget 2x gave 1.773 val bits/byte, 4x 1.758, 8x 1.752 (docs/benchmarks.md).
# bench/quality.py measures the recipe against the GPT-2 one at equal wall-clock on a preset's
# shape; the default preset trains it.
RECOMMENDED_MODEL = {"position": "rope", "norm": "rmsnorm", "qk_norm": True, "mlp": "relu2", "tie_embeddings": False}
GPT2_MODEL = {k: getattr(ModelConfig(), k) for k in RECOMMENDED_MODEL}  # ModelConfig's defaults are GPT-2's
RECOMMENDED_LR_SCALE = 8.0


def recommended(cfg: PipelineConfig) -> PipelineConfig:
    """`cfg`, a GPT-2-recipe config, with the recommended recipe for its model and pretraining."""
    check_gpt2(cfg)
    train = cfg.pretrain
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, **RECOMMENDED_MODEL),
        pretrain=dataclasses.replace(
            train,
            lr=train.lr * RECOMMENDED_LR_SCALE,
            min_lr=train.min_lr * RECOMMENDED_LR_SCALE,
            optimizer="muon",
        ),
    )


def check_gpt2(cfg: PipelineConfig) -> None:
    """Refuse a config that does not train the GPT-2 recipe, naming the fields that differ."""
    differ = {k: getattr(cfg.model, k) for k, v in GPT2_MODEL.items() if getattr(cfg.model, k) != v}
    if cfg.pretrain.optimizer != "adamw":
        differ["optimizer"] = cfg.pretrain.optimizer
    if differ:
        raise ConfigError(f"not the GPT-2 recipe: {differ}")


def default_gpt2() -> PipelineConfig:
    """The default preset with the GPT-2 recipe (learned positions, LayerNorm, GELU, a tied head,
    AdamW): the main job as it was before the recommended recipe, and a model that
    `export --format hf` takes."""
    return PipelineConfig(
        finetune=FinetuneConfig(
            max_steps=400,
            batch_size=32,
            lr=1e-3,
            min_lr=1e-4,
            warmup_steps=20,
            eval_interval=100,
            eval_batches=8,
            checkpoint_interval=400,
        ),
        sft=SFTConfig(
            max_steps=300,
            batch_size=16,
            lr=1e-3,
            min_lr=1e-4,
            warmup_steps=20,
            eval_interval=100,
            log_interval=50,
            checkpoint_interval=300,
        ),
    )


def default() -> PipelineConfig:
    """The README's main job: the whole pipeline on a 2-core CPU in about 10 minutes, pretraining
    the recommended recipe (`default-gpt2`: the same with the GPT-2 recipe)."""
    return recommended(default_gpt2())


def tiny() -> PipelineConfig:
    """Seconds per stage: for tests and smoke runs."""
    return PipelineConfig(
        tokenizer=TokenizerConfig(vocab_size=512),
        model=ModelConfig(block_size=64, n_layer=2, n_head=2, n_embd=64),
        pretrain=TrainConfig(
            max_steps=200,
            batch_size=16,
            lr=3e-3,
            min_lr=3e-4,
            warmup_steps=10,
            eval_interval=100,
            eval_batches=4,
            log_interval=50,
            checkpoint_interval=100,
        ),
        finetune=FinetuneConfig(
            max_steps=500,
            batch_size=32,
            lr=3e-3,
            min_lr=3e-4,
            warmup_steps=20,
            eval_interval=100,
            eval_batches=8,
            log_interval=100,
            checkpoint_interval=500,
            passage_tokens=64,
            patience=3,
        ),
        sft=SFTConfig(
            max_steps=150,
            batch_size=16,
            lr=3e-3,
            min_lr=3e-4,
            warmup_steps=10,
            eval_interval=50,
            log_interval=50,
            checkpoint_interval=150,
            eval_conversations=200,
            max_new_tokens=24,
        ),
        compress=CompressConfig(
            max_steps=40,
            batch_size=16,
            warmup_steps=5,
            eval_interval=20,
            eval_batches=4,
            log_interval=20,
            checkpoint_interval=20,
            calibration_windows=16,
        ),
        evaluate=EvalConfig(max_new_tokens=24, max_eval_tokens=20_000),
    )


def gpu() -> PipelineConfig:
    """One GPU, five minutes of pretraining: a 6-layer, 384-wide model on Shakespeare."""
    return PipelineConfig(
        tokenizer=TokenizerConfig(vocab_size=8192),
        model=ModelConfig(block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.1),
        pretrain=TrainConfig(
            max_steps=100_000,
            time_budget_s=300.0,
            batch_size=64,
            lr=1e-3,
            min_lr=1e-4,
            warmup_steps=200,
            eval_interval=1000,
            eval_batches=20,
            log_interval=100,
            checkpoint_interval=2000,
            compile=True,
        ),
        finetune=FinetuneConfig(
            max_steps=1500,
            batch_size=64,
            lr=2e-4,
            min_lr=2e-5,
            warmup_steps=100,
            eval_interval=250,
            eval_batches=20,
            log_interval=50,
            checkpoint_interval=1500,
            passage_tokens=128,
        ),
        sft=SFTConfig(
            max_steps=2000,
            batch_size=64,
            lr=2e-4,
            min_lr=2e-5,
            warmup_steps=100,
            eval_interval=250,
            log_interval=50,
            checkpoint_interval=1000,
            eval_conversations=2000,
        ),
        evaluate=EvalConfig(max_eval_tokens=2_000_000),
    )


def gpt2_124m() -> PipelineConfig:
    """GPT-2 small: 12 layers, 768 wide, 12 heads, context 1024, vocabulary 50304; ~0.5M tokens a step.

    For a GPU and a corpus far larger than Shakespeare (the tokenizer stops merging where the
    corpus runs out of pairs); raise pretrain.nproc_per_node to use more GPUs.
    """
    return PipelineConfig(
        tokenizer=TokenizerConfig(vocab_size=50304),
        model=ModelConfig(block_size=1024, n_layer=12, n_head=12, n_embd=768),
        pretrain=TrainConfig(
            max_steps=10000,
            batch_size=16,
            grad_accum_steps=32,
            lr=6e-4,
            min_lr=6e-5,
            warmup_steps=700,
            eval_interval=250,
            eval_batches=20,
            log_interval=10,
            checkpoint_interval=1000,
            compile=True,
        ),
        finetune=FinetuneConfig(
            max_steps=2000,
            batch_size=32,
            lr=1e-4,
            min_lr=1e-5,
            warmup_steps=100,
            eval_interval=250,
            eval_batches=20,
            log_interval=50,
            checkpoint_interval=1000,
            passage_tokens=256,
        ),
        sft=SFTConfig(
            max_steps=2000,
            batch_size=32,
            lr=1e-4,
            min_lr=1e-5,
            warmup_steps=100,
            eval_interval=250,
            log_interval=50,
            checkpoint_interval=1000,
            eval_conversations=2000,
            max_new_tokens=128,
        ),
        evaluate=EvalConfig(max_eval_tokens=5_000_000),
    )


PRESETS = {"default": default, "default-gpt2": default_gpt2, "tiny": tiny, "gpu": gpu, "gpt2-124m": gpt2_124m}


# --- loading --------------------------------------------------------------------------------


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether a value read from a file fits a field's annotation (an int fits a float field)."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, h) for h in get_args(hint))
    if origin is list:
        item = (get_args(hint) or (Any,))[0]
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint in (int, float):
        return isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _number(text: str) -> int | float | None:
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return None


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) and get_origin(hint) is None else str(hint)


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    """Instantiate dataclass `cls` from `values`, naming the dotted field on any error."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a table of fields, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        dotted = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, dotted)
        elif not _type_ok(value, hint):
            note = ""
            if isinstance(value, str) and _type_ok(_number(value), hint):
                note = " (a number read as text: quoted, or YAML's 1e-3, which needs a dot: 1.0e-3)"
            raise ConfigError(f"{dotted}: expected {_type_name(hint)}, got {type(value).__name__} {value!r}{note}")
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}.{e}" if where else str(e)) from None
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def merge(base: PipelineConfig, overrides: dict[str, Any]) -> PipelineConfig:
    """Return `base` with `overrides` (nested dict by stage) applied, validated again."""
    if not isinstance(overrides, dict):
        raise ConfigError(f"expected a table of sections (pretrain, model...), got {type(overrides).__name__}")
    values = base.to_dict()
    for section, fields in overrides.items():
        if section not in values:
            raise ConfigError(f"unknown section {section!r}; known: {sorted(values)}")
        if not isinstance(fields, dict):
            raise ConfigError(f"{section}: expected a table of fields, got {type(fields).__name__}")
        values[section] = {**values[section], **fields}
    return _build(PipelineConfig, values, "")


def load_config(path: str | Path | None = None, preset: str = "default") -> PipelineConfig:
    """A preset, with the fields of a YAML or TOML file (if given) laid over it."""
    if preset not in PRESETS:
        raise ConfigError(f"preset: unknown preset {preset!r}; known: {sorted(PRESETS)}")
    config = PRESETS[preset]()
    if path is None:
        return config
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        try:
            overrides = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    elif path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            overrides = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
        overrides = {} if overrides is None else overrides
    else:
        raise ConfigError(f"{path}: config must be .yaml, .yml or .toml")
    try:
        return merge(config, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
