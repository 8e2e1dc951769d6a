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
    "train_tokenizer": "gptcore.tokenizer",
    "pretrain": "gptcore.pretrain",
    "finetune": "gptcore.finetune",
    "evaluate_lm": "gptcore.evaluate",
    "evaluate_classifier": "gptcore.evaluate",
    "export_lm_onnx": "gptcore.export",
    "export_classifier_onnx": "gptcore.export",
    "register": "gptcore.registry",
}

__all__ = ["__version__", *_STAGES]


def __getattr__(name: str) -> Any:
    if name in _STAGES:
        return getattr(importlib.import_module(_STAGES[name]), name)
    raise AttributeError(f"module 'gptcore' has no attribute {name!r}")
