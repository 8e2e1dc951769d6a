"""Where each stage writes inside a work directory: the CLI and the flows agree through this."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def export_lm(self) -> Path:
        return self.root / "export" / "lm"

    @property
    def export_classifier(self) -> Path:
        return self.root / "export" / "classifier"

    @property
    def scores(self) -> Path:
        return self.root / "scores"
