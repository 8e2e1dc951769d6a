"""An `ingest.filters` predicate that keeps every document but takes its time: it holds tasks on
the cluster's workers long enough for the worker-loss test to kill one mid-task."""

import time


def keep_slowly(text: str, metadata: dict) -> bool:
    time.sleep(0.004)
    return True
