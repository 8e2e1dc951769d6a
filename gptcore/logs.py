"""What a person reads in a stage's log: gptcore's own progress lines, and from the libraries
underneath only what is worth their attention (warnings and errors), with no progress bars.

`GPTCORE_LIBRARY_LOG_LEVEL=INFO` (or DEBUG) lets the libraries speak again when a problem needs it.
"""

from __future__ import annotations

import logging
import os

LIBRARY_LOG_LEVEL_ENV = "GPTCORE_LIBRARY_LOG_LEVEL"
# The libraries that log at INFO during a run: MLflow's database migrations and system-metrics
# monitor, alembic under it, HTTP clients' request lines, the Hugging Face stack, matplotlib's fonts.
LIBRARIES = (
    "mlflow",
    "alembic",
    "httpx",
    "httpcore",
    "urllib3",
    "datasets",
    "huggingface_hub",
    "filelock",
    "matplotlib",
)


def quiet_libraries() -> None:
    """The libraries at WARNING (or $GPTCORE_LIBRARY_LOG_LEVEL), and MLflow's artifact progress bars off:
    drawn with carriage returns, they interleave with the stage's own lines in every log they reach."""
    level = os.environ.get(LIBRARY_LOG_LEVEL_ENV, "WARNING").upper()
    if level not in logging.getLevelNamesMapping():
        level = "WARNING"
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(level)
    # MLflow sets its loggers' level when it is first imported, which may come later: tell it too.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", level)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def console_logging() -> None:
    """gptcore's progress lines on stderr, the libraries quiet."""
    logger = logging.getLogger("gptcore")
    if not any(getattr(h, "_gptcore_console", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
        handler._gptcore_console = True
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # Prefect's console handler on the root logger would print each line again
    quiet_libraries()
