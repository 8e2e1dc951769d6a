"""gptcore: build a GPT from raw text, track it, register it, serve it.

Importing `gptcore` is cheap: the stage functions below load torch, datasets and MLflow only
when called, so `import gptcore.runtime` in a downstream app pulls in none of them.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# stage name -> module that defines it; each is a plain function also exposed as a CLI verb.
_STAGES = {
    "ingest": "gptcore.data.ingest",
    "train_tokenizer": "gptcore.data.tokenizer",
    "pretrain": "gptcore.train.pretrain",
    "finetune": "gptcore.train.finetune",
    "sft": "gptcore.train.sft",
    "evaluate_lm": "gptcore.eval.lm",
    "evaluate_classifier": "gptcore.eval.classifier",
    "evaluate_sft": "gptcore.eval.chat",
    "export_lm_onnx": "gptcore.export.lm",
    "export_classifier_onnx": "gptcore.export.classifier",
    "register": "gptcore.registry.register",
    "score": "gptcore.registry.score",
}

__all__ = ["__version__", *_STAGES]


def __getattr__(name: str) -> Any:
    if name in _STAGES:
        return getattr(importlib.import_module(_STAGES[name]), name)
    raise AttributeError(f"module 'gptcore' has no attribute {name!r}")
