"""Typed configuration: one dataclass per stage, validated once, at construction.

Every field is documented where it is declared and checked in `__post_init__`; a bad value
raises `ConfigError` naming the field (`pretrain.lr: must be > 0, got 0`). A YAML or TOML file
overrides any field of a preset (`load_config`). Presets are functions returning a config.
This module imports nothing heavy: the CLI and the runtime may read configs without torch.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from gptcore.errors import ConfigError


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {message}")


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _check(value > 0, name, f"must be > 0, got {value!r}")


@dataclass
class IngestConfig:
    sources: list[str] = field(default_factory=lambda: ["shakespeare"])
    """Where documents come from: `shakespeare` (built in), a path or glob of .txt/.md/.jsonl/
    .jsonl.gz/.jsonl.zst/.parquet/.csv files, or `hf:NAME[:CONFIG][@SPLIT]` for a Hugging Face dataset."""
    text_field: str = "text"
    """Field holding the text in .jsonl/.parquet records and Hugging Face datasets."""
    metadata_fields: list[str] = field(default_factory=list)
    """Extra record fields kept as columns of the splits (e.g. a label); must exist in every record."""
    val_fraction: float = 0.05
    """Share of documents held out for validation (at least one document)."""
    test_fraction: float = 0.05
    """Share of documents held out for test (at least one document)."""
    dedup: bool = True
    """Drop documents whose cleaned text exactly repeats an earlier one."""
    near_dedup: bool = False
    """Also drop near-duplicates (MinHash LSH over word 5-grams); costs memory and time per document."""
    near_dedup_threshold: float = 0.8
    """Estimated Jaccard similarity at which a document counts as a near-duplicate."""
    remove_control_chars: bool = True
    """Remove control characters other than tab and newline."""
    redact_pii: bool = True
    """Replace e-mail addresses, IP addresses and phone numbers with <EMAIL>, <IP_ADDRESS>, <PHONE>."""
    min_document_bytes: int = 1
    """Drop cleaned documents shorter than this (UTF-8 bytes)."""
    max_document_bytes: int = 16_000_000
    """Skip records longer than this while reading (never held whole) and drop longer cleaned documents."""
    filters: list[str] = field(default_factory=list)
    """Extra predicates `module:function(text, metadata) -> bool` (False drops), e.g.
    `gptcore.data.filters:mostly_letters`; language or quality filters plug in here."""
    invalid_utf8: str = "fail"
    """`fail` (error naming the file and byte offset) or `replace` (U+FFFD, counted)."""
    bad_records: str = "fail"
    """A JSONL/CSV/Parquet record that is not JSON, lacks a field or has a non-text text field:
    `fail` (error naming file and line) or `skip` (counted)."""
    hf_streaming: bool = True
    """Stream Hugging Face datasets instead of downloading them whole first."""

    def __post_init__(self) -> None:
        _check(len(self.sources) > 0, "sources", "needs at least one source")
        _check(self.invalid_utf8 in ("fail", "replace"), "invalid_utf8", f"must be fail or replace, got {self.invalid_utf8!r}")
        _check(self.bad_records in ("fail", "skip"), "bad_records", f"must be fail or skip, got {self.bad_records!r}")
        _check(0 < self.near_dedup_threshold <= 1, "near_dedup_threshold",
               f"must be in (0, 1], got {self.near_dedup_threshold}")
        _positive(self, "min_document_bytes", "max_document_bytes")
        _check(self.min_document_bytes <= self.max_document_bytes, "min_document_bytes",
               f"{self.min_document_bytes} exceeds max_document_bytes={self.max_document_bytes}")
        for spec in self.filters:
            _check(spec.count(":") == 1 and all(spec.split(":")), "filters", f"{spec!r} is not 'module:function'")
        _check(bool(self.text_field), "text_field", "must not be empty")
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            _check(0 < value < 0.5, name, f"must be in (0, 0.5), got {value!r}")


@dataclass
class TokenizerConfig:
    vocab_size: int = 4096
    """Size of the byte-level BPE vocabulary, special tokens included."""
    min_frequency: int = 2
    """A merge must occur at least this often in the training sample."""
    sample_bytes: int = 64_000_000
    """Train BPE on at most this many bytes of the train split: every k-th document, spread over it."""
    shard_tokens: int = 100_000_000
    """Tokens per shard file (the last shard of a split holds the rest)."""
    workers: int = 0
    """Processes that encode in parallel; 0: one per CPU core."""

    def __post_init__(self) -> None:
        # 256 byte tokens + the special tokens must fit.
        _check(self.vocab_size >= 260, "vocab_size", f"must be >= 260, got {self.vocab_size}")
        _positive(self, "min_frequency", "sample_bytes", "shard_tokens")
        _check(self.workers >= 0, "workers", f"must be >= 0, got {self.workers}")


@dataclass
class ModelConfig:
    block_size: int = 128
    """Context length in tokens."""
    n_layer: int = 4
    """Number of transformer blocks."""
    n_head: int = 4
    """Attention heads per block; must divide n_embd."""
    n_embd: int = 128
    """Width of the residual stream."""
    dropout: float = 0.0
    """Dropout on embeddings, attention and MLP outputs while training."""
    bias: bool = True
    """Biases in Linear and LayerNorm, as in GPT-2."""
    vocab_size: int | None = None
    """Taken from the tokenizer when left unset."""
    position: str = "learned"
    """`learned` position embeddings (GPT-2) or `rope` (rotary, applied to queries and keys)."""
    norm: str = "layernorm"
    """`layernorm` (GPT-2) or `rmsnorm`."""
    qk_norm: bool = False
    """RMS-normalise each head's queries and keys before attention."""
    mlp: str = "gelu"
    """`gelu` (GPT-2, 4x wide), `relu2` (squared ReLU, 4x wide) or `swiglu` (gated, 8/3x wide: same parameters)."""
    tie_embeddings: bool = True
    """Share one matrix between the token embedding and the LM head (GPT-2)."""

    def __post_init__(self) -> None:
        _positive(self, "block_size", "n_layer", "n_head", "n_embd")
        for name, allowed in (("position", ("learned", "rope")), ("norm", ("layernorm", "rmsnorm")),
                              ("mlp", ("gelu", "relu2", "swiglu"))):
            _check(getattr(self, name) in allowed, name, f"must be one of {allowed}, got {getattr(self, name)!r}")
        _check(self.position != "rope" or (self.n_embd // self.n_head) % 2 == 0, "position",
               "rope needs an even head size (n_embd / n_head)")
        _check(self.n_embd % self.n_head == 0, "n_embd", f"{self.n_embd} is not divisible by n_head={self.n_head}")
        _check(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        _check(self.vocab_size is None or self.vocab_size > 0, "vocab_size", f"must be > 0, got {self.vocab_size}")


@dataclass
class TrainConfig:
    max_steps: int = 600
    """Optimizer steps (a cap, when time_budget_s is set)."""
    time_budget_s: float | None = None
    """Train for this many seconds instead (evaluation and checkpoints excluded): the step time,
    measured over the run's first steps, fixes the steps that fit, and the LR schedule ends there."""
    batch_size: int = 32
    """Sequences per micro-batch."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 3e-3
    """Peak learning rate, reached after warmup."""
    min_lr: float = 3e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 50
    """Linear warmup from 0 to lr."""
    weight_decay: float = 0.1
    """AdamW decay on matrices; biases, norms and embeddings get none."""
    beta1: float = 0.9
    beta2: float = 0.95
    optimizer: str = "adamw"
    """`adamw`, or `muon`: torch.optim.Muon for the blocks' weight matrices, AdamW for the rest."""
    muon_lr: float = 0.02
    """Muon's peak learning rate (the schedule scales it like lr)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    eval_interval: int = 100
    """Evaluate on the validation split every this many steps (and at the end)."""
    eval_batches: int = 8
    """Validation batches per evaluation."""
    log_interval: int = 20
    """Print a progress line (loss, rate, ETA) every this many steps."""
    checkpoint_interval: int = 200
    """Write a resumable checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = 2
    """Keep the newest this many checkpoints."""
    seed: int = 1337
    device: str = "auto"
    """`auto` (cuda if available, else cpu), `cpu`, `cuda`, `cuda:N`."""
    compile: bool = False
    """torch.compile the model: pays off on long GPU runs, not on short CPU ones."""
    nproc_per_node: int = 1
    """Data-parallel processes (one per GPU); above 1 the pipeline launches torchrun on this machine."""
    parallelism: str = "ddp"
    """Across processes: `ddp` (a model replica per GPU) or `fsdp` (parameters, gradients and optimizer
    state sharded with fully_shard: for models whose training state does not fit one GPU)."""
    peak_tflops: float | None = None
    """The device's dense bf16 peak for MFU; known GPUs (H100, H200, A100) need none, CPUs have no MFU without it."""

    def __post_init__(self) -> None:
        _positive(self, "max_steps", "batch_size", "grad_accum_steps", "lr", "eval_interval", "nproc_per_node",
                  "eval_batches", "log_interval", "checkpoint_interval", "keep_checkpoints")
        _check(0 <= self.min_lr <= self.lr, "min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr}")
        _check(0 <= self.warmup_steps < self.max_steps, "warmup_steps",
               f"must be in [0, max_steps={self.max_steps}), got {self.warmup_steps}")
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(0 < self.beta1 < 1 and 0 < self.beta2 < 1, "beta1/beta2", "must be in (0, 1)")
        _check(self.grad_clip >= 0, "grad_clip", f"must be >= 0, got {self.grad_clip}")
        _check(self.optimizer in ("adamw", "muon"), "optimizer", f"must be adamw or muon, got {self.optimizer!r}")
        _check(self.muon_lr > 0, "muon_lr", f"must be > 0, got {self.muon_lr}")
        _check(self.time_budget_s is None or self.time_budget_s > 0, "time_budget_s",
               f"must be > 0, got {self.time_budget_s}")
        _check(self.parallelism in ("ddp", "fsdp"), "parallelism", f"must be ddp or fsdp, got {self.parallelism!r}")
        _check(not (self.parallelism == "fsdp" and self.optimizer == "muon"), "parallelism",
               "fsdp shards each matrix, and Muon needs whole matrices: use optimizer adamw with fsdp")
        _check(self.peak_tflops is None or self.peak_tflops > 0, "peak_tflops", f"must be > 0, got {self.peak_tflops}")
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
               "device", f"must be auto, cpu or cuda[:N], got {self.device!r}")


@dataclass
class FinetuneConfig(TrainConfig):
    """Sequence classification: the training fields above plus what defines the task."""

    label_field: str = "genre"
    """Column of the ingested splits that holds each document's label."""
    passage_tokens: int = 64
    """Documents are cut into passages of this many tokens (at most the model's block_size)."""
    patience: int = 3
    """Stop after this many evaluations without a better validation macro-F1."""
    method: str = "full"
    """`full` trains every weight; `lora` freezes the GPT and trains low-rank updates of the
    `lora_targets` layers plus the head (merged into the weights at the end: export is unchanged)."""
    lora_rank: int = 8
    """Rank r of each LoRA update B A."""
    lora_alpha: float = 16.0
    """The update is scaled by lora_alpha / lora_rank."""
    lora_dropout: float = 0.0
    """Dropout on the input of the LoRA branch."""
    lora_targets: list[str] = field(default_factory=lambda: ["attn.qkv", "attn.proj", "wte"])
    """Layers that get LoRA, by name suffix: attn.qkv, attn.proj, mlp.fc, mlp.proj, and wte (the
    token embedding: without it the words' meaning cannot move, and genre hangs on names).
    LoRA trains best at a higher lr than full fine-tuning (bench/peft.py uses 3x)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(bool(self.label_field), "label_field", "must not be empty")
        _positive(self, "passage_tokens", "patience", "lora_rank", "lora_alpha")
        _check(self.method in ("full", "lora"), "method", f"must be full or lora, got {self.method!r}")
        _check(0 <= self.lora_dropout < 1, "lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        known = {"attn.qkv", "attn.proj", "mlp.fc", "mlp.proj", "wte"}
        _check(bool(self.lora_targets) and set(self.lora_targets) <= known, "lora_targets",
               f"must be a non-empty subset of {sorted(known)}, got {self.lora_targets}")


@dataclass
class EvalConfig:
    prompts: list[str] = field(default_factory=lambda: ["ROMEO.", "To be, or not", "Enter a Messenger"])
    """Fixed prompts for the generated samples."""
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int = 50
    seed: int = 0
    max_eval_tokens: int = 200_000
    """Cap on tokens scored per split for loss/bpb (the whole split when smaller)."""

    def __post_init__(self) -> None:
        _positive(self, "max_new_tokens", "top_k", "max_eval_tokens")
        _check(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")


@dataclass
class ExportConfig:
    opset: int = 18
    """ONNX opset of the exported graphs."""
    parity_atol: float = 1e-3
    """Largest allowed |logit difference| between ONNX Runtime and PyTorch."""
    parity_tokens: int = 32
    """Greedy tokens that must match exactly between ONNX Runtime and PyTorch."""

    def __post_init__(self) -> None:
        _positive(self, "parity_atol", "parity_tokens")
        _check(self.opset >= 17, "opset", f"must be >= 17 (LayerNormalization), got {self.opset}")


@dataclass
class RegistryConfig:
    lm_name: str = "gptcore-lm"
    """Registered model name of the language model."""
    classifier_name: str = "gptcore-classifier"
    """Registered model name of the classifier."""

    def __post_init__(self) -> None:
        _check(bool(self.lm_name) and bool(self.classifier_name), "lm_name/classifier_name", "must not be empty")


@dataclass
class PipelineConfig:
    ingest: IngestConfig = field(default_factory=IngestConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)

    def __post_init__(self) -> None:
        _check(self.finetune.passage_tokens <= self.model.block_size, "finetune.passage_tokens",
               f"{self.finetune.passage_tokens} exceeds model.block_size={self.model.block_size}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- presets --------------------------------------------------------------------------------


def default() -> PipelineConfig:
    """The README's main job: the whole pipeline on a 2-core CPU in well under 10 minutes."""
    return PipelineConfig(
        finetune=FinetuneConfig(max_steps=400, batch_size=32, lr=1e-3, min_lr=1e-4, warmup_steps=20,
                                eval_interval=100, eval_batches=8, checkpoint_interval=400),
    )


def tiny() -> PipelineConfig:
    """Seconds per stage: for tests and smoke runs."""
    return PipelineConfig(
        tokenizer=TokenizerConfig(vocab_size=512),
        model=ModelConfig(block_size=64, n_layer=2, n_head=2, n_embd=64),
        pretrain=TrainConfig(max_steps=200, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=10,
                             eval_interval=100, eval_batches=4, log_interval=50, checkpoint_interval=100),
        finetune=FinetuneConfig(max_steps=500, batch_size=32, lr=3e-3, min_lr=3e-4, warmup_steps=20,
                                eval_interval=100, eval_batches=8, log_interval=100, checkpoint_interval=500,
                                passage_tokens=64, patience=3),
        evaluate=EvalConfig(max_new_tokens=24, max_eval_tokens=20_000),
    )


def gpu() -> PipelineConfig:
    """One GPU, five minutes of pretraining: a 6-layer, 384-wide model on Shakespeare."""
    return PipelineConfig(
        tokenizer=TokenizerConfig(vocab_size=8192),
        model=ModelConfig(block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.1),
        pretrain=TrainConfig(max_steps=100_000, time_budget_s=300.0, batch_size=64, lr=1e-3, min_lr=1e-4,
                             warmup_steps=200, eval_interval=1000, eval_batches=20, log_interval=100,
                             checkpoint_interval=2000, compile=True),
        finetune=FinetuneConfig(max_steps=1500, batch_size=64, lr=2e-4, min_lr=2e-5, warmup_steps=100,
                                eval_interval=250, eval_batches=20, log_interval=50, checkpoint_interval=1500,
                                passage_tokens=128),
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
        pretrain=TrainConfig(max_steps=10000, batch_size=16, grad_accum_steps=32, lr=6e-4, min_lr=6e-5,
                             warmup_steps=700, eval_interval=250, eval_batches=20, log_interval=10,
                             checkpoint_interval=1000, compile=True),
        finetune=FinetuneConfig(max_steps=2000, batch_size=32, lr=1e-4, min_lr=1e-5, warmup_steps=100,
                                eval_interval=250, eval_batches=20, log_interval=50, checkpoint_interval=1000,
                                passage_tokens=256),
        evaluate=EvalConfig(max_eval_tokens=5_000_000),
    )


PRESETS = {"default": default, "tiny": tiny, "gpu": gpu, "gpt2-124m": gpt2_124m}


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
