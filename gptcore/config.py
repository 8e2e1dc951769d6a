"""Typed configuration: one dataclass per stage, validated once, at construction.

Every field is documented where it is declared and checked in `__post_init__`; a bad value
raises `ConfigError` naming the field (`pretrain.lr: must be > 0, got 0`). A YAML or TOML file
overrides any field of a preset (`gptcore.presets.load_config`). This module imports nothing
heavy: the CLI and the runtime may read configs without torch.

A config is trusted input, like code: fields that name code (`ingest.filters`, `module:function`)
import that module and call that function in the process that runs the stage, with its
permissions. Run only configs you would run as code; never a config from an untrusted source.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from gptcore.errors import check, check_address, check_non_negative, check_one_of, check_positive, check_within


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
    max_row_group_bytes: int = 1 << 30
    """Refuse a Parquet source's row group whose columns read (the text and metadata fields) exceed
    this many bytes uncompressed: pyarrow reads a row group whole, and reading one costs up to about
    4.5 times its size in memory (a 256 MiB row group: 1.1 GiB peak). Rewrite such a file with
    smaller row groups, or raise this."""
    filters: list[str] = field(default_factory=list)
    """Extra predicates `module:function(text, metadata) -> bool` (False drops), e.g.
    `gptcore.data.filters:mostly_letters`; language or quality filters plug in here. Trusted input:
    each module is imported and each function run in the ingest processes, so a config naming
    filters is code; take one only from a source you would take code from."""
    invalid_utf8: str = "fail"
    """`fail` (error naming the file and byte offset) or `replace` (U+FFFD, counted)."""
    bad_records: str = "fail"
    """A JSONL/CSV/Parquet record that is not JSON, lacks a field or has a non-text text field:
    `fail` (error naming file and line) or `skip` (counted)."""
    hf_streaming: bool = True
    """Stream Hugging Face datasets instead of downloading them whole first."""
    group_field: str | None = None
    """Split by group instead of by document: every document with one value of this field (an
    author, a module, a play) lands in the same split, so no group is in both train and test.
    `source` groups by source file (named relative to its source, as ids are); any other name is
    a record field, kept as a column like `metadata_fields`, which every document must carry.
    Unset: each document is its own group (split by a hash of its id)."""
    workers: int = 0
    """Processes that read and clean the sources in parallel, a file (a Parquet row group) a task;
    Shakespeare and a hub dataset are one task each. 0: one per CPU core, 1: in this process.
    Dedup, the split and the writing stay in one process, in input order: the outputs are the
    same bytes whatever the count."""
    cluster: str | None = None
    """A Dask scheduler's address (`tcp://host:8786`): read and clean on its workers instead of
    this machine's (`workers` then unused). The workers need gptcore and the same paths to the
    sources and work directory (a shared filesystem); the outputs are the same bytes. Unset: this
    machine. Point it only at a scheduler you run: Dask sends code to its workers."""

    def __post_init__(self) -> None:
        check(len(self.sources) > 0, "sources", "needs at least one source")
        check_one_of(self, "invalid_utf8", ("fail", "replace"))
        check_one_of(self, "bad_records", ("fail", "skip"))
        check_within(self, "near_dedup_threshold", 0, 1, low_open=True)
        check_positive(self, "min_document_bytes", "max_document_bytes", "max_row_group_bytes")
        check_non_negative(self, "workers")
        check_address(self, "cluster")
        check(
            self.min_document_bytes <= self.max_document_bytes,
            "min_document_bytes",
            f"{self.min_document_bytes} exceeds max_document_bytes={self.max_document_bytes}",
        )
        for spec in self.filters:
            check(spec.count(":") == 1 and all(spec.split(":")), "filters", f"{spec!r} is not 'module:function'")
        check(bool(self.text_field), "text_field", "must not be empty")
        check(
            self.group_field not in ("", "id", "text"),
            "group_field",
            f"{self.group_field!r} groups nothing; name a record field or 'source', or leave it unset (by document)",
        )
        for name in ("val_fraction", "test_fraction"):
            check_within(self, name, 0, 0.5, low_open=True, high_open=True)


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
    cluster: str | None = None
    """A Dask scheduler's address: encode on its workers instead of this machine's (as `ingest.cluster`)."""

    def __post_init__(self) -> None:
        # 256 byte tokens + the special tokens must fit.
        check(self.vocab_size >= 260, "vocab_size", f"must be >= 260, got {self.vocab_size}")
        check_positive(self, "min_frequency", "sample_bytes", "shard_tokens")
        check_non_negative(self, "workers")
        check_address(self, "cluster")


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
        check_positive(self, "block_size", "n_layer", "n_head", "n_embd")
        check_one_of(self, "position", ("learned", "rope"))
        check_one_of(self, "norm", ("layernorm", "rmsnorm"))
        check_one_of(self, "mlp", ("gelu", "relu2", "swiglu"))
        check(self.n_embd % self.n_head == 0, "n_embd", f"{self.n_embd} is not divisible by n_head={self.n_head}")
        check(
            self.position != "rope" or (self.n_embd // self.n_head) % 2 == 0,
            "position",
            "rope needs an even head size (n_embd / n_head)",
        )
        check_within(self, "dropout", 0, 1, high_open=True)
        check_positive(self, "vocab_size", unset_ok=True)


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
    """`adamw`, or `muon`: Muon (gptcore.train.optim) for the blocks' weight matrices, AdamW for the rest."""
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
        check_positive(self, "max_steps", "batch_size", "grad_accum_steps", "lr", "nproc_per_node")
        check_positive(self, "eval_interval", "eval_batches", "log_interval", "checkpoint_interval", "keep_checkpoints")
        check(0 <= self.min_lr <= self.lr, "min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr}")
        check(
            0 <= self.warmup_steps < self.max_steps,
            "warmup_steps",
            f"must be in [0, max_steps={self.max_steps}), got {self.warmup_steps}",
        )
        for name in ("beta1", "beta2"):
            check_within(self, name, 0, 1, low_open=True, high_open=True)
        check_non_negative(self, "weight_decay", "grad_clip")
        check_one_of(self, "optimizer", ("adamw", "muon"))
        check_positive(self, "muon_lr")
        check_positive(self, "time_budget_s", "peak_tflops", unset_ok=True)
        check_one_of(self, "parallelism", ("ddp", "fsdp"))
        check(
            not (self.parallelism == "fsdp" and self.optimizer == "muon"),
            "parallelism",
            "fsdp shards each matrix, and Muon needs whole matrices: use optimizer adamw with fsdp",
        )
        check(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            "device",
            f"must be auto, cpu or cuda[:N], got {self.device!r}",
        )


@dataclass
class PeftConfig:
    """Which weights a fine-tuning stage trains, and how: shared by every stage that fine-tunes a GPT."""

    method: str = "full"
    """`full` trains every weight. The others freeze the GPT and train the head plus: `lora`, low-rank
    updates of the `lora_targets` layers (merged into the weights at load: export is unchanged);
    `adapter`, a bottleneck MLP after each block's attention and MLP output (and the norms);
    `prefix`, learned keys and values that every token attends to in every layer (classifier only).
    These train best at a higher lr than full fine-tuning (bench/peft.py: the scales and results)."""
    lora_rank: int = 8
    """Rank r of each LoRA update B A."""
    lora_alpha: float = 16.0
    """The update is scaled by lora_alpha / lora_rank."""
    lora_dropout: float = 0.0
    """Dropout on the input of the LoRA branch."""
    lora_targets: list[str] = field(default_factory=lambda: ["attn.qkv", "attn.proj", "wte"])
    """Layers that get LoRA, by name suffix: attn.qkv, attn.proj, mlp.fc, mlp.proj, and wte (the
    token embedding: without it the words' meaning cannot move, and genre hangs on names)."""
    adapter_size: int = 16
    """Bottleneck width of each adapter (method adapter)."""
    prefix_tokens: int = 16
    """Learned key/value positions per layer (method prefix); they take no position ids, so
    passages keep the whole block_size."""

    def __post_init__(self) -> None:
        self.check_peft()

    def check_peft(self) -> None:
        """Validate the fields above; a subclass with a `__post_init__` of its own calls this from it."""
        check_one_of(self, "method", ("full", "lora", "adapter", "prefix"))
        check_positive(self, "lora_rank", "lora_alpha", "adapter_size", "prefix_tokens")
        check_within(self, "lora_dropout", 0, 1, high_open=True)
        known = {"attn.qkv", "attn.proj", "mlp.fc", "mlp.proj", "wte"}
        check(
            bool(self.lora_targets) and set(self.lora_targets) <= known,
            "lora_targets",
            f"must be a non-empty subset of {sorted(known)}, got {self.lora_targets}",
        )


@dataclass
class FinetuneConfig(TrainConfig, PeftConfig):
    """Sequence classification: the training fields, the method (PeftConfig) and what defines the task."""

    enabled: bool = True
    """Run the classifier branch of the pipeline (fine-tune, evaluate, export, register, score); it is
    also skipped, saying so, when the corpus has no `label_field` column or fewer than 2 labels."""
    label_field: str = "genre"
    """Column of the ingested splits that holds each document's label."""
    passage_tokens: int = 64
    """Documents are cut into passages of this many tokens (at most the model's block_size)."""
    patience: int = 3
    """Stop after this many evaluations without a better validation macro-F1."""
    class_weights: bool = False
    """Weight the loss by inverse class frequency in train ("balanced"), for imbalanced labels."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_peft()
        check(bool(self.label_field), "label_field", "must not be empty")
        check_positive(self, "passage_tokens", "patience")


@dataclass
class SFTConfig(TrainConfig, PeftConfig):
    """Chat supervised fine-tuning: the training fields, the method (PeftConfig: full, lora or
    adapter) plus the data and its evaluation."""

    lora_targets: list[str] = field(default_factory=lambda: ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"])
    """As for classification, but never wte: the embedding is tied to the LM head, which the
    update would change at merge without having been trained through it."""

    enabled: bool = True
    """Run the chat branch of the pipeline (SFT and its evaluation); it is also skipped, saying so,
    when `data` is unset and the corpus has no dialogue in the plays' markup."""
    data: str | None = None
    """A chat JSONL file (`prompt`/`response` or `messages` records); unset: the built-in example
    from the ingested plays (runs of four speeches of a scene as user and assistant turns)."""
    val_fraction: float = 0.05
    """Share of the chat file's conversations held out for validation (the plays use the ingest splits)."""
    test_fraction: float = 0.05
    """Share held out for the evaluation against the base model."""
    patience: int = 3
    """Stop after this many evaluations without a lower validation response loss."""
    eval_conversations: int = 400
    """Held-out conversations scored per evaluation (validation during training, test after it)."""
    samples: int = 4
    """Held-out prompts answered by the base and the fine-tuned model, side by side."""
    max_new_tokens: int = 48
    temperature: float = 0.8
    top_k: int = 50

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_peft()
        check(self.method != "prefix", "method", "prefix-tuning is for classification; use full, lora or adapter")
        check(
            self.method != "lora" or "wte" not in self.lora_targets,
            "lora_targets",
            "wte is tied to the LM head: LoRA on it would change the head at merge; leave it out",
        )
        check_positive(self, "patience", "eval_conversations", "max_new_tokens", "top_k")
        check_non_negative(self, "samples", "temperature")
        for name in ("val_fraction", "test_fraction"):
            check_within(self, name, 0, 0.5, low_open=True, high_open=True)
        check(self.data is None or bool(self.data.strip()), "data", "must be a path to a chat JSONL file, or unset")


@dataclass
class CompressConfig(TrainConfig):
    """Students of the pretrained LM: structured pruning to a share of its parameters, then recovery
    by distillation against its logits; the training fields are the recovery's."""

    max_steps: int = 300
    """Recovery steps (and the from-scratch students'): half of pretraining's, a fraction of its tokens."""
    lr: float = 1e-3
    """Peak learning rate of the recovery: the student starts from trained weights."""
    min_lr: float = 1e-4
    warmup_steps: int = 20
    enabled: bool = False
    """Run the compress stage in the pipeline, and evaluate, export and register each distilled
    student (off by default: it does not fit the CPU main job's time)."""
    fractions: list[float] = field(default_factory=lambda: [0.75, 0.5])
    """Each student's target share of the teacher's parameters (it gets the largest shape within it)."""
    prune: str = "both"
    """What shrinks: `depth` (whole blocks, the least important by measured loss), `width` (residual
    channels, head dimensions and MLP neurons, by activation) or `both` (blocks in proportion, then width)."""
    calibration_windows: int = 64
    """Training windows the importance of blocks, channels and neurons is measured on."""
    temperature: float = 2.0
    """Softmax temperature of the distillation KL (the KL term is scaled by its square)."""
    kl_weight: float = 0.5
    """Loss = kl_weight * KL(teacher || student) + (1 - kl_weight) * the LM loss."""
    scratch: bool = False
    """Also train each student's shape from random weights without the teacher, for the same steps
    (at `scratch_lr`): the comparison that says what the teacher's weights and logits bought."""
    scratch_lr: float = 3e-3
    """Peak learning rate of the from-scratch students (a pretraining rate, not a recovery one)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(bool(self.fractions), "fractions", "name at least one share of the parameters")
        for fraction in self.fractions:
            check(0 < fraction <= 1, "fractions", f"each must be in (0, 1], got {fraction}")
        check(len(set(self.fractions)) == len(self.fractions), "fractions", "each share once")
        check_one_of(self, "prune", ("depth", "width", "both"))
        check_positive(self, "calibration_windows", "temperature", "scratch_lr")
        check_within(self, "kl_weight", 0, 1)


@dataclass
class EvalConfig:
    prompts: list[str] = field(default_factory=lambda: ["ROMEO.", "To be, or not", "Enter a Messenger"])
    """Fixed prompts for the generated samples."""
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int = 50
    seed: int = 0
    max_eval_tokens: int = 200_000
    """Cap on tokens scored per split for loss/bpb (the whole split when smaller), and on the test
    tokens scored document by document for the per-document bpb (whole documents, in split order)."""

    def __post_init__(self) -> None:
        check_positive(self, "max_new_tokens", "top_k", "max_eval_tokens")
        check_non_negative(self, "temperature")


@dataclass
class ExportConfig:
    opset: int = 18
    """ONNX opset of the exported graphs."""
    parity_atol: float = 1e-3
    """Largest allowed |logit difference| between ONNX Runtime and PyTorch."""
    parity_tokens: int = 32
    """Greedy tokens that must match exactly between ONNX Runtime and PyTorch."""
    optimize: bool = True
    """Fuse attention, LayerNorm and GELU into ONNX Runtime's fused ops (onnxscript's ORT fusions)."""
    variants: list[str] = field(default_factory=lambda: ["fp16", "int8"])
    """Precision variants to add beside fp32: fp16 (for CUDA) and int8 (8-bit weights for CPU)."""
    min_agreement_fp16: float = 0.98
    """The fp16 variant is kept only if its argmax agrees with PyTorch fp32's on this share of
    validation positions (teacher-forced: both read the same text)."""
    min_agreement_int8: float = 0.90
    """...and the int8 variant on this share."""

    def __post_init__(self) -> None:
        check_positive(self, "parity_atol", "parity_tokens")
        check(self.opset >= 17, "opset", f"must be >= 17 (LayerNormalization), got {self.opset}")
        unknown = sorted(set(self.variants) - {"fp16", "int8"})
        check(not unknown, "variants", f"unknown {unknown}; choose among fp16, int8 (fp32 is always exported)")
        for name in ("min_agreement_fp16", "min_agreement_int8"):
            check_within(self, name, 0, 1)


@dataclass
class RegistryConfig:
    lm_name: str = "gptcore-lm"
    """Registered model name of the language model."""
    classifier_name: str = "gptcore-classifier"
    """Registered model name of the classifier."""
    chat_name: str = "gptcore-chat"
    """Registered model name of the chat model."""
    min_improvement: float = 0.0
    """A classifier is promoted only when the 95% interval of its macro-F1 gain over the
    champion (paired bootstrap on the same test examples) lies entirely above this."""
    guard_tolerance: float = 0.02
    """...and its accuracy drops by no more than this, and its calibration error rises by no more."""
    lm_min_improvement: float = 0.0
    """A language model is promoted only when the 95% interval of its bits-per-byte reduction
    from the champion's (paired bootstrap over the same test documents) lies entirely above this."""
    bootstrap_resamples: int = 1000
    """Resamples of the paired bootstrap."""

    def __post_init__(self) -> None:
        for name in ("lm_name", "classifier_name", "chat_name"):
            check(bool(getattr(self, name)), name, "must not be empty")
        check_non_negative(self, "min_improvement", "lm_min_improvement", "guard_tolerance")
        check(self.bootstrap_resamples >= 100, "bootstrap_resamples", f"must be >= 100, got {self.bootstrap_resamples}")


@dataclass
class ScoreConfig:
    chunk_rows: int = 10_000
    """Rows per chunk of a batch-scoring run: memory holds one chunk, each chunk's predictions go to
    their own part file, and an interrupted run resumes from the last finished chunk."""
    batch_size: int = 64
    """Texts per ONNX Runtime call."""
    drift_threshold: float = 0.25
    """Flag drift when the population stability index of the predicted labels, or of the confidences,
    against the model's own test-set predictions exceeds this (0.25: the usual line of a major shift)."""
    enabled: bool = True
    """Score the test split with the champion classifier at the end of the pipeline (`gptcore score`
    and the scoring flow score whatever this says)."""

    def __post_init__(self) -> None:
        check_positive(self, "chunk_rows", "batch_size", "drift_threshold")


@dataclass
class PipelineConfig:
    ingest: IngestConfig = field(default_factory=IngestConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)

    def __post_init__(self) -> None:
        check(
            self.finetune.passage_tokens <= self.model.block_size,
            "finetune.passage_tokens",
            f"{self.finetune.passage_tokens} exceeds model.block_size={self.model.block_size}",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
