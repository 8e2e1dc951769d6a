"""Where each stage writes, and the names of what it writes: the producers, the readers
(`gptcore.results`), the CLI and the flows agree through this module alone.

    WORKDIR/data/        ingest: {train,val,test}.parquet, manifest.json
    WORKDIR/tokenizer/   tokenizer: tokenizer.json, {split}_NNNNN.bin shards, tokens.json
    WORKDIR/pretrain/    pretrain: checkpoints/step_*/, best/, metrics.jsonl, result.json
    WORKDIR/finetune/    finetune: the same
    WORKDIR/sft/         chat SFT: the same, plus tokenizer.json with the chat tokens
    WORKDIR/compress/    compress: result.json, and p<percent>-<recipe>/ per student, each pretrain-shaped
    WORKDIR/eval/        the three evaluations, each with files of its own (EVAL_FILES)
    WORKDIR/eval/students/<student>/   a student's LM evaluation
    WORKDIR/export/lm/, export/classifier/, export/lm-<student>/   ONNX model packages (gptcore_model.json
                         describes each)
    WORKDIR/scores/      batch scoring's output
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "val", "test")
INGEST_MANIFEST = "manifest.json"
TOKENS_MANIFEST = "tokens.json"
TOKENIZER_FILE = "tokenizer.json"
RESULT_FILE = "result.json"  # a training stage's result, in its directory
BEST_DIR = "best"  # a training stage's best weights
PACKAGE_META = "gptcore_model.json"

# The tokenizer's special tokens: documents end in EOT; PAD fills batches and never carries loss.
EOT, PAD = "<|endoftext|>", "<|pad|>"
SPECIAL_TOKENS = [EOT, PAD]

LM_EVAL, LM_SAMPLES, DOC_BPB_FILE = "lm_eval.json", "samples.txt", "lm_doc_bpb.npz"
CLASSIFIER_EVAL, CONFUSION_MATRIX, ATTRIBUTIONS = "classifier_eval.json", "confusion_matrix.png", "attributions.html"
PREDICTIONS_FILE, SCORING_REFERENCE_FILE = "classifier_predictions.npz", "classifier_scoring_reference.npz"
SFT_EVAL, SFT_SAMPLES, SFT_DOC_BPB = "sft_eval.json", "sft_samples.md", "sft_conversation_bpb.npz"
# The evaluations share WORKDIR/eval: each owns only these files there.
EVAL_FILES = {
    "lm": (LM_EVAL, LM_SAMPLES, DOC_BPB_FILE),
    "classifier": (CLASSIFIER_EVAL, CONFUSION_MATRIX, ATTRIBUTIONS, PREDICTIONS_FILE, SCORING_REFERENCE_FILE),
    "sft": (SFT_EVAL, SFT_SAMPLES, SFT_DOC_BPB),
}

# The registry: aliases, and the tags naming what a version keeps beside its model.
CHAMPION, CHALLENGER = "champion", "challenger"
CHECKPOINT_ARTIFACT, CHECKPOINT_TAG = "checkpoint", "gptcore.checkpoint_artifact"
PREDICTIONS_TAG, SCORING_REFERENCE_TAG = "gptcore.predictions_artifact", "gptcore.scoring_reference_artifact"
# a version's package and evaluation, by content: registering both again reuses the version
REGISTRATION_DIGEST_TAG = "gptcore.registration_digest"
# on the export run: the digest of the package it wrote (a version's source run is found by it)
PACKAGE_DIGEST_TAG = "gptcore.package_digest"


@dataclass(frozen=True)
class Workdir:
    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root).resolve())

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def pretrain(self) -> Path:
        return self.root / "pretrain"

    @property
    def finetune(self) -> Path:
        return self.root / "finetune"

    @property
    def sft(self) -> Path:
        return self.root / "sft"

    @property
    def compress(self) -> Path:
        return self.root / "compress"

    def student(self, name: str) -> Path:
        """A compressed student's directory (its name as `gptcore.results.load_compressed` lists it)."""
        return self.compress / name

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    def student_eval(self, name: str) -> Path:
        return self.eval / "students" / name

    def export(self, kind: str) -> Path:
        """The ONNX package of `kind` (lm or classifier)."""
        return self.root / "export" / kind

    @property
    def scores(self) -> Path:
        return self.root / "scores"
