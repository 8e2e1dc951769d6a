"""Which optional branches of the pipeline run: decided from the config and the ingested splits,
right after ingestion and before pretraining, so that no stage is started on data it will not find.

The language model always runs. The other branches run when they are enabled and the corpus has
their data in every split (training picks its checkpoint on val, evaluation reads test):

- `classifier` (finetune, its evaluation, export and registration) needs the column
  `finetune.label_field`, with at least two labels in train;
- `score` (the test split scored with the champion classifier) needs the classifier;
- `chat` (SFT and its evaluation) needs `sft.data`, or dialogue in the plays' markup
  (speeches under `**SPEAKER**` lines).

A branch that does not run gets one line saying why and which field to set.
"""

from __future__ import annotations

from pathlib import Path

from gptcore.config import FinetuneConfig, PipelineConfig, SFTConfig
from gptcore.data.chat import play_dialogues
from gptcore.errors import InputError
from gptcore.layout import SPLITS
from gptcore.results import load_ingest, read_split

CLASSIFIER, SCORE, CHAT = "classifier", "score", "chat"


def optional_stages(cfg: PipelineConfig, data_dir: str | Path) -> dict[str, str | None]:
    """Each optional branch -> None when it runs, else the reason it is skipped, naming what to set."""
    load_ingest(data_dir)  # a clear error if ingestion has not written data_dir, rather than a skip
    classifier = classifier_skipped(cfg.finetune, data_dir)
    if classifier is not None:
        score = "score skipped: it scores with the classifier, which is skipped"
    elif not cfg.score.enabled:
        score = "score skipped: score.enabled is false"
    else:
        score = None
    return {CLASSIFIER: classifier, SCORE: score, CHAT: chat_skipped(cfg.sft, data_dir)}


def classifier_skipped(cfg: FinetuneConfig, data_dir: str | Path) -> str | None:
    """Why the classifier branch cannot run on the splits in `data_dir`; None when it can."""
    import pyarrow.parquet as pq

    if not cfg.enabled:
        return "classifier skipped: finetune.enabled is false"
    fix = (
        "set finetune.label_field to a label column of your corpus (kept by ingest.metadata_fields), "
        "or finetune.enabled: false"
    )
    field = cfg.label_field
    for split in SPLITS:
        columns = pq.read_schema(Path(data_dir) / f"{split}.parquet").names
        if field not in columns:
            where = "corpus" if split == "train" else f"{split} split"
            return f"classifier skipped: the {where} has no {field!r} column (columns: {', '.join(columns)}); {fix}"
    values = read_split(data_dir, "train", [field]).column(field).to_pylist()
    labels = {str(v) for v in values if v is not None and str(v).strip()}
    if len(labels) < 2:
        return (
            f"classifier skipped: the train split has {len(labels)} distinct {field!r} label(s), "
            f"a classifier needs at least 2; {fix}"
        )
    return None


def chat_skipped(cfg: SFTConfig, data_dir: str | Path) -> str | None:
    """Why the chat branch cannot run on the splits in `data_dir`; None when it can."""
    if not cfg.enabled:
        return "chat skipped: sft.enabled is false"
    if cfg.data is not None:
        return None  # the chat file's own errors are SFT's to report: it was asked for
    # The small splits first: a corpus without dialogue is told apart without reading train.
    for split in ("test", "val", "train"):
        try:
            play_dialogues(data_dir, split)
        except InputError:
            return (
                f"chat skipped: the corpus has no dialogue in its {split} split (speeches under **SPEAKER** "
                f"lines, as in the built-in plays); set sft.data to a chat JSONL file, or sft.enabled: false"
            )
    return None
