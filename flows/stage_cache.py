"""Stage-level resume across pipeline runs, through Prefect's task cache.

Prefect's default cache key includes the flow run id, so no result carries over from one run
to the next. Here a stage's key hashes what its result depends on, and nothing else:

- its code: the source of the module that defines the stage function and of every gptcore
  module that one imports, directly or through others (read from the source, not run), so a
  change to the training loop re-runs the stages that train and a change to the exporter only
  the exports;
- its parameters: configs as their values, paths as written, the MLflow settings but never the
  per-run parent run id a `Tracking` carries;
- a digest of what it reads (`path_digest`): the directories and files the stages before it
  wrote, or a ready digest (the ingest sources' fingerprint).

Prefect keeps the result as JSON (never a pickle) under WORKDIR/.prefect-results, named by that
key. A recorded result is reused only while the stage's own outputs are as the stage left them:
after each run the digest of its outputs is recorded beside the result, and a later run that
finds other outputs there (deleted, rewritten by hand, or by a run of another config) runs the
stage again, through Prefect's `refresh_cache`, as does a `fresh` pipeline run.
"""

from __future__ import annotations

import ast
import contextlib
import contextvars
import dataclasses
import functools
import hashlib
import importlib.util
import inspect
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.utilities.annotations import quote

from gptcore.data.lineage import code_digest
from gptcore.fsutil import read_json, sha256_file, write_json
from gptcore.tracking import Tracking

RESULTS_DIR = ".prefect-results"
# Files up to this size (manifests, markers, evaluation JSONs, configs) are hashed; larger ones
# (token shards, weights, Parquet splits) are known by size and modification time, which any
# rewrite changes: hashing gigabytes on every run would cost more than some stages.
CONTENT_DIGEST_MAX_BYTES = 1 << 20

# A stage's parameters (by name, defaults filled in) -> what it reads or writes: paths to digest,
# ready digests (str), or None for "cannot be known", which rules the cache out for that call.
PathsOf = Callable[[dict[str, Any]], list[Path | str | None]]


def named(*names: str) -> PathsOf:
    """The paths in these parameters (those left None are skipped)."""
    return lambda params: [Path(params[n]) for n in names if params[n] is not None]


def _source_file(module: str) -> Path | None:
    """Where a gptcore module's source is, found without importing anything."""
    base = Path(importlib.util.find_spec("gptcore").origin).parent.joinpath(*module.split(".")[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None  # `from gptcore.x import y` where y is a name, not a module


@functools.cache
def _gptcore_imports(module: str) -> tuple[str, ...]:
    """The gptcore modules (and candidate modules: `from gptcore.x import y`) a module's source imports."""
    path = _source_file(module) if module.startswith("gptcore.") else Path(importlib.util.find_spec(module).origin)
    if path is None:
        return ()
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.startswith("gptcore.")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("gptcore."):
            found += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return tuple(found)


def imported_modules(module: str) -> list[str]:
    """`module` and every gptcore module it imports, directly or through others (read from the source), sorted."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name not in seen and (not name.startswith("gptcore.") or _source_file(name) is not None):
            seen.add(name)
            todo += _gptcore_imports(name)
    return sorted(seen)


def path_digest(path: str | Path) -> str:
    """A file's or a directory's contents (dot-files, i.e. temporaries and caches, left out); 'absent' if missing."""
    path = Path(path)
    if path.is_file():
        files = [(path.name, path)]
    elif path.is_dir():
        files = sorted(
            (p.relative_to(path).as_posix(), p)
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
    else:
        return "absent"
    h = hashlib.sha256()
    for name, file in files:
        stat = file.stat()
        what = sha256_file(file) if stat.st_size <= CONTENT_DIGEST_MAX_BYTES else f"{stat.st_size}:{stat.st_mtime_ns}"
        h.update(f"{name}\0{what}\n".encode())
    return h.hexdigest()


def digest_all(items: list[Path | str | None]) -> str | None:
    """One digest of paths (their contents) and ready digests; None if any item is unknowable."""
    if any(item is None for item in items):
        return None
    parts = [path_digest(item) if isinstance(item, Path) else item for item in items]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _plain(value: Any) -> Any:
    """The JSON form of a parameter in a cache key."""
    if isinstance(value, Tracking):
        return dataclasses.asdict(value.settings)  # not parent_run_id: it names this run's MLflow parent
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"a {type(value).__name__} parameter cannot be part of a stage cache key")


def _unquoted(value: Any) -> Any:
    """An argument as the stage gets it: Prefect unwraps a `quote` before calling the task."""
    return value.unquote() if isinstance(value, quote) else value


def registered_aliases(tracking: Tracking | None, name: str) -> str | None:
    """What registering leaves in the MLflow registry: the model's aliases and their versions.

    'absent' when there is no such model; None when MLflow cannot say (unreachable), so the
    stage runs (and retries) rather than trust a record it cannot check.
    """
    if tracking is None:
        return None
    from mlflow.exceptions import MlflowException

    try:
        model = tracking.client().get_registered_model(name)
    except MlflowException as e:
        return "absent" if e.error_code == "RESOURCE_DOES_NOT_EXIST" else None
    return json.dumps(dict(model.aliases), sort_keys=True)


@dataclasses.dataclass(frozen=True)
class StageCache:
    """Where one pipeline run keeps stage results (Prefect's records) and their outputs' digests."""

    results_dir: Path
    fresh: bool = False

    def _outputs_file(self, key: str) -> Path:
        return self.results_dir / "outputs" / f"{key}.json"

    def recorded_outputs(self, key: str) -> str | None:
        try:
            return read_json(self._outputs_file(key))["outputs"]
        except (OSError, ValueError, KeyError, TypeError):  # none recorded, or a damaged record: run again
            return None

    def record_outputs(self, key: str, stage: str, outputs: str | None) -> None:
        write_json(self._outputs_file(key), {"stage": stage, "outputs": outputs})


_active: contextvars.ContextVar[StageCache | None] = contextvars.ContextVar("gptcore_stage_cache", default=None)


@contextlib.contextmanager
def stage_cache(workdir: str | Path, fresh: bool = False) -> Iterator[StageCache]:
    """Stages called inside this block reuse results recorded in WORKDIR/.prefect-results (all run if `fresh`)."""
    cache = StageCache(Path(workdir).resolve() / RESULTS_DIR, fresh)
    token = _active.set(cache)
    try:
        yield cache
    finally:
        _active.reset(token)


class CachedStage:
    """A Prefect task that calls one stage function, reused across runs inside `stage_cache`.

    Outside `stage_cache` it is the plain task, without a cache.
    """

    def __init__(
        self, task: Any, reads: PathsOf, writes: PathsOf, views: dict[str, Callable[[Any], Any]] | None = None
    ):
        self.task, self.reads, self.writes = task, reads, writes
        self.views = views or {}  # parameter -> the part of it the stage depends on (pretraining: 2 config sections)
        self.signature = inspect.signature(task.fn)

    @property
    def name(self) -> str:
        return self.task.name

    def with_options(self, **options: Any) -> CachedStage:
        """The same stage, its task with other options (a name of its own, in one pipeline run)."""
        return CachedStage(self.task.with_options(**options), self.reads, self.writes, self.views)

    def key(self, params: dict[str, Any]) -> str | None:
        reads = digest_all(self.reads(params))
        if reads is None:
            return None
        fn = self.task.fn
        state = {
            "stage": f"{fn.__module__}.{fn.__qualname__}",
            "code": code_digest(imported_modules(fn.__module__)),
            "params": {k: self.views[k](v) if k in self.views else v for k, v in params.items()},
            "reads": reads,
        }
        return hashlib.sha256(json.dumps(state, sort_keys=True, default=_plain).encode()).hexdigest()

    def __call__(self, *args: Any, wait_for: list[Any] | None = None, return_state: bool = False, **kwargs: Any) -> Any:
        """Run the stage (or reuse its recorded result); `wait_for` and `return_state` as for a Prefect task."""
        cache = _active.get()
        if cache is None:
            return self.task(*args, wait_for=wait_for, return_state=return_state, **kwargs)
        logger = get_run_logger()
        bound = self.signature.bind(*map(_unquoted, args), **{k: _unquoted(v) for k, v in kwargs.items()})
        bound.apply_defaults()
        params = dict(bound.arguments)
        key = self.key(params)
        if key is None:
            logger.info("%s: not cached: one of its inputs has no fingerprint (a Hugging Face dataset)", self.name)
            return self.task(*args, wait_for=wait_for, return_state=return_state, **kwargs)
        recorded = cache.recorded_outputs(key)
        reuse = not cache.fresh and recorded is not None and recorded == digest_all(self.writes(params))
        if recorded is not None and not reuse and not cache.fresh:
            logger.info("%s: its outputs are not as its recorded run left them: running it again", self.name)
        task = self.task.with_options(
            cache_policy=CacheKeyFnPolicy(cache_key_fn=lambda _context, _params: key),
            persist_result=True,
            result_serializer="json",
            result_storage=cache.results_dir,
            refresh_cache=not reuse,
        )
        state = task(*args, return_state=True, wait_for=wait_for, **kwargs)
        result = state.result()  # the stage's own error, if it failed
        if state.name == "Cached":
            logger.info(
                "%s: skipped: inputs, config and code unchanged and outputs intact since an earlier run; "
                "its recorded result is reused (%s)",
                self.name,
                key[:16],
            )
        else:
            cache.record_outputs(key, self.name, digest_all(self.writes(params)))
        return state if return_state else result
