"""A model package: the directory `gptcore.export.package` writes and the registry stores.

    model.onnx  tokenizer.json  gptcore_model.json   [model.fp16.onnx  model.int8.onnx]

`gptcore_model.json` lists the precision variants the package holds, each with its parity
figures; a package without that list holds the fp32 graph alone.

A package is untrusted input (a registry version anyone with write access can replace), so it
is refused at load, with an `InputError` naming the file and field, rather than misread later:
every file it names must resolve, symlinks followed, to a regular file inside the package; the
description and the tokenizer are size-bounded before they are read; the description's fields
are typed and ranged, and must agree with the tokenizer and (`check_graph`, once the session
exists) with the graph's inputs and outputs.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from gptcore.errors import InputError, redact
from gptcore.fsutil import sha256_file
from gptcore.runtime.template import CHAT_TOKENS

# The LM graph's inputs besides its cache, by format: 2 added logit_positions (and listed
# variants); 3 writes the cache in place, so the attention mask went.
LM_INPUTS = {
    1: ("input_ids", "position_ids", "attention_mask"),
    2: ("input_ids", "position_ids", "attention_mask", "logit_positions"),
    3: ("input_ids", "position_ids", "logit_positions"),
}
FORMAT_VERSIONS = tuple(LM_INPUTS)
CLASSIFIER_INPUTS = ("input_ids", "attention_mask")
CACHE_TYPES = ("tensor(float)", "tensor(float16)")
KINDS = ("lm", "classifier", "chat")
FILES = ("model.onnx", "tokenizer.json", "gptcore_model.json")
# field -> (least, most): the most is far past any model this runtime can hold, so only nonsense is refused.
INT_FIELDS = {
    "block_size": (1, 1 << 20),
    "n_layer": (1, 1024),
    "n_head": (1, 1024),
    "head_dim": (1, 1 << 14),
    "vocab_size": (1, 1 << 24),
    "eos_token_id": (0, 1 << 24),
    "pad_token_id": (0, 1 << 24),
}
# A description is a few KiB and GPT-2's tokenizer.json 1.4 MB: past these a file is refused unread.
MAX_META_BYTES = 1 << 20
MAX_TOKENIZER_BYTES = 64 << 20


@dataclass
class ModelPackage:
    path: Path
    kind: str  # "lm", "classifier" or "chat"
    meta: dict[str, Any]  # gptcore_model.json
    tokenizer: Any  # tokenizers.Tokenizer

    @property
    def variants(self) -> dict[str, dict[str, Any]]:
        """variant -> {"file", "parity"}: fp32 always, fp16 and int8 where the export kept them."""
        return self.meta.get("variants") or {"fp32": {"file": "model.onnx", "parity": self.meta.get("parity", {})}}

    def choose_variant(self, variant: str, on_cuda: bool) -> str:
        """`variant`, checked; "auto" is fp16 on CUDA where the package has it, else fp32 (exact)."""
        if variant == "auto":
            return "fp16" if on_cuda and "fp16" in self.variants else "fp32"
        if variant not in self.variants:
            raise InputError(f"{self.path}: has no {variant!r} variant (it has: {', '.join(self.variants)})")
        return variant

    def variant_path(self, variant: str) -> Path:
        """The variant's graph file, as resolved (and checked to be inside the package) at load."""
        return self.path / self.variants[variant]["file"]


def path_inside(root: Path, name: str, what: str) -> Path:
    """`root / name` with every symlink resolved, refused unless it stays under `root` (itself
    resolved). `what` says where the name came from (a file, a field), for the message."""
    if not isinstance(name, str) or not name or "\0" in name or PurePosixPath(name).is_absolute():
        raise InputError(f"{what}: {name!r} is not a relative path inside {root}")
    path = Path(os.path.realpath(root / name))
    if not path.is_relative_to(root):
        raise InputError(f"{what}: {name!r} resolves to {path}, outside {root}; refused")
    return path


def file_inside(root: Path, name: str, what: str) -> Path:
    """`path_inside`, and a regular file. Nothing is opened: a FIFO or a device is refused by its
    type, before anything could block reading it."""
    path = path_inside(root, name, what)
    if not path.is_file():
        state = "not a regular file" if os.path.lexists(path) else "missing"
        raise InputError(f"{what}: {name!r} is {state} in {root}")
    return path


def read_bounded(path: Path, limit: int) -> bytes:
    """The bytes of `path`, refused past `limit` without reading more than limit + 1 of them."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise InputError(f"{path}: larger than {limit} bytes, the most this runtime reads for it; refused")
    return data


def check_meta(meta: Any, where: Path) -> None:
    """Refuse a description this runtime would misread, naming the field."""
    if not isinstance(meta, dict):
        raise InputError(f"{where}: expected a JSON object")
    if meta.get("format_version") not in FORMAT_VERSIONS:
        raise InputError(
            f"{where}: format_version {meta.get('format_version')!r}; this runtime reads "
            f"{', '.join(map(str, FORMAT_VERSIONS))}"
        )
    if meta.get("kind") not in KINDS:
        raise InputError(f"{where}: unknown kind {meta.get('kind')!r}; known: {', '.join(KINDS)}")
    for field, (least, most) in INT_FIELDS.items():
        value = meta.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or not least <= value <= most:
            raise InputError(f"{where}: field {field!r} must be an integer in [{least}, {most}], got {value!r}")
    for field in ("eos_token_id", "pad_token_id"):
        if meta[field] >= meta["vocab_size"]:
            raise InputError(
                f"{where}: field {field!r} is {meta[field]}, not an id below vocab_size {meta['vocab_size']}"
            )
    if meta["kind"] == "classifier":
        labels = meta.get("labels")
        if not (isinstance(labels, list) and labels and all(isinstance(x, str) for x in labels)):
            raise InputError(f"{where}: field 'labels' must be a non-empty list of strings, got {labels!r}")
        if len(set(labels)) != len(labels):
            raise InputError(f"{where}: field 'labels' repeats a label: {labels}")
    if meta["kind"] == "chat":
        check_chat(meta, where)
    variants = meta.get("variants", {})
    if not isinstance(variants, dict) or not all(
        isinstance(v, dict) and plain_file_name(v.get("file")) for v in variants.values()
    ):
        raise InputError(f"{where}: field 'variants' must map each variant to {{'file': NAME, ...}}, got {variants!r}")
    if variants and "fp32" not in variants:
        raise InputError(f"{where}: field 'variants' lacks fp32 (the graph every package has), got {list(variants)}")


def plain_file_name(name: Any) -> bool:
    """A name of a file directly in the package: no directories, no way up."""
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def check_chat(meta: dict, where: Path) -> None:
    """A chat package names the id of each of the template's tokens, inside the vocabulary, each its own."""
    tokens = meta.get("chat", {}).get("tokens") if isinstance(meta.get("chat"), dict) else None
    ids = [tokens.get(t) for t in CHAT_TOKENS] if isinstance(tokens, dict) else []
    if not (
        len(ids) == len(CHAT_TOKENS)
        and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < meta["vocab_size"] for i in ids)
        and len(set(ids)) == len(ids)
    ):
        raise InputError(
            f"{where}: field 'chat.tokens' must map each of {', '.join(CHAT_TOKENS)} to its own token id "
            f"below vocab_size {meta['vocab_size']}, got {tokens!r}"
        )


def load_package(path: str | Path) -> ModelPackage:
    """The package in directory `path`, checked: its files are inside it, its description is
    readable and consistent, its tokenizer loads and has the description's vocabulary."""
    from tokenizers import Tokenizer

    if not Path(path).is_dir():
        raise InputError(f"{path}: no such model package directory")
    root = Path(os.path.realpath(path))
    files = {name: file_inside(root, name, f"{root / name}") for name in FILES}
    meta_path = files["gptcore_model.json"]
    meta_bytes = read_bounded(meta_path, MAX_META_BYTES)
    try:
        meta = json.loads(meta_bytes)
    except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InputError(f"{meta_path}: not valid JSON: {e}") from None
    check_meta(meta, meta_path)
    for variant, entry in (meta.get("variants") or {}).items():
        file_inside(root, entry["file"], f"{meta_path}: field 'variants.{variant}.file'")
    tokenizer_path = files["tokenizer.json"]
    tokenizer_bytes = read_bounded(tokenizer_path, MAX_TOKENIZER_BYTES)
    try:
        tokenizer = Tokenizer.from_str(tokenizer_bytes.decode("utf-8"))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise InputError(f"{tokenizer_path}: cannot be loaded as a tokenizer: {e}") from None
    if tokenizer.get_vocab_size() != meta["vocab_size"]:
        raise InputError(
            f"{tokenizer_path}: holds {tokenizer.get_vocab_size()} tokens, but {meta_path} field 'vocab_size' "
            f"says {meta['vocab_size']}"
        )
    return ModelPackage(root, meta["kind"], meta, tokenizer)


def check_graph(package: ModelPackage, variant: str, session) -> None:
    """Refuse a graph that does not take and return what the description says, naming the field:
    the inputs of its format and kind, a cache of n_layer layers of (n_head, head_dim), and logits
    over vocab_size tokens (an LM) or one per label (a classifier)."""
    meta, onnx_path = package.meta, package.variant_path(variant)
    where = f"{onnx_path} (the {variant} graph) against {package.path / 'gptcore_model.json'}"
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    if "logits" not in outputs:
        raise InputError(f"{where}: the graph has no 'logits' output (it has: {', '.join(outputs)})")
    logits = outputs["logits"].shape
    if package.kind == "classifier":
        expect_names(where, "inputs", inputs, CLASSIFIER_INPUTS, "kind 'classifier'")
        expect_dims(where, "logits", logits, [None, len(meta["labels"])], "the number of 'labels'")
        return
    fmt, n_layer = meta["format_version"], meta["n_layer"]
    past = [f"past_{kind}_{i}" for i in range(n_layer) for kind in ("key", "value")]
    present = [f"present_{kind}_{i}" for i in range(n_layer) for kind in ("key", "value")]
    expect_names(where, "inputs", inputs, (*LM_INPUTS[fmt], *past), f"'format_version' {fmt} and 'n_layer' {n_layer}")
    expect_names(where, "outputs", outputs, ("logits", *present), f"'n_layer' {n_layer}")
    cache_shape = [None, meta["n_head"], None, meta["head_dim"]]
    for name in (*past, *present):
        cache = inputs.get(name) or outputs[name]
        expect_dims(where, name, cache.shape, cache_shape, "'n_head' and 'head_dim'")
    if len({inputs[name].type for name in past}) != 1 or inputs[past[0]].type not in CACHE_TYPES:
        raise InputError(f"{where}: the cache inputs must all be one of {', '.join(CACHE_TYPES)}")
    expect_dims(where, "logits", logits, [None, None, meta["vocab_size"]], "'vocab_size'")


def expect_names(where: str, what: str, got: dict, expected: tuple[str, ...], field: str) -> None:
    if set(got) != set(expected):
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        raise InputError(
            f"{where}: the graph's {what} are not those of {field}: missing {missing or 'none'}, "
            f"unexpected {extra or 'none'}"
        )


def expect_dims(where: str, name: str, shape: list, expected: list, field: str) -> None:
    """`shape` of rank len(expected), each static dimension equal to the expected one (None: any)."""
    ok = len(shape) == len(expected) and all(
        want is None or not isinstance(dim, int) or dim == want for dim, want in zip(shape, expected)
    )
    if not ok:
        wanted = ["*" if want is None else want for want in expected]
        raise InputError(f"{where}: {name!r} has shape {shape}, expected {wanted} from {field}")


def package_digest(package_dir: Path) -> str:
    """sha256 over the package's files (names and contents): the model's identity wherever it was downloaded to."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(package_dir).iterdir() if p.is_file()):
        h.update(f"{path.name}\0{sha256_file(path)}\0".encode())
    return h.hexdigest()


def resolve_model_uri(
    uri: str | Path,
    tracking_uri: str | None = None,
    registry_uri: str | None = None,
    download_dir: Path | None = None,
) -> Path:
    """A local package directory for `uri`: a path, `models:/NAME@ALIAS`, `models:/NAME/VERSION` or `runs:/...`.

    Registry and run URIs are downloaded from MLflow: `tracking_uri` (default: MLflow's own
    resolution, e.g. MLFLOW_TRACKING_URI) and `registry_uri` (default: the tracking URI) say which
    server; into `download_dir` where given (else MLflow makes a temporary directory that nothing
    removes, for a remote artifact store). A local path is returned as is, or the package inside it
    where it is a gptcore pyfunc model directory.
    """
    uri = str(uri)
    if uri.startswith(("models:/", "runs:/")):
        return download_package(uri, tracking_uri, registry_uri or tracking_uri, download_dir)
    path = Path(uri)
    if not path.is_dir():
        raise InputError(f"{uri}: no such model package directory (or use models:/NAME@ALIAS or runs:/RUN_ID/PATH)")
    return package_in(path)


def download_package(uri: str, tracking_uri: str | None, registry_uri: str | None, into: Path | None = None) -> Path:
    # MLflow is imported here only: serving from a local directory must not need it.
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    dst_path = None if into is None else str(into)
    try:
        if uri.startswith("runs:/"):
            return package_in(Path(download_artifacts(artifact_uri=uri, tracking_uri=tracking_uri, dst_path=dst_path)))
        # A models:/ URI handed to download_artifacts also drops MLflow's registered_model_meta
        # file into the download; downloading the version's source gives exactly the model.
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)
        version = model_version(client, uri)
        source = client.get_model_version_download_uri(version.name, version.version)
        return package_in(Path(download_artifacts(artifact_uri=source, tracking_uri=tracking_uri, dst_path=dst_path)))
    except MlflowException as e:
        raise InputError(f"{uri}: cannot be resolved: {redact(e.message)}") from None


def package_in(directory: Path) -> Path:
    """The package in `directory`: the directory itself, or the `package` artifact of the gptcore
    pyfunc model there (what the registry logs; versions registered before that are bare packages),
    which must lie inside `directory`."""
    if not os.path.lexists(directory / "MLmodel"):
        return directory
    import yaml

    root = Path(os.path.realpath(directory))
    mlmodel = file_inside(root, "MLmodel", f"{directory / 'MLmodel'}")
    try:
        flavor = yaml.safe_load(read_bounded(mlmodel, MAX_META_BYTES))["flavors"]["python_function"]
        name = flavor["artifacts"]["package"]["path"]
    except (yaml.YAMLError, TypeError, KeyError):
        raise InputError(
            f"{mlmodel}: an MLflow model, but not a gptcore pyfunc model (no pyfunc "
            "artifact 'package'); give a gptcore model package or a version gptcore registered"
        ) from None
    return path_inside(root, name, f"{mlmodel}: field 'flavors.python_function.artifacts.package.path'")


def model_version(client, uri: str):
    """The registered version (an MLflow ModelVersion) that `models:/NAME@ALIAS` or `models:/NAME/VERSION` names."""
    name, _, alias = uri[len("models:/") :].partition("@")
    if alias:
        return client.get_model_version_by_alias(name, alias)
    name, _, version = name.partition("/")
    if not name or not version:
        raise InputError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    return client.get_model_version(name, version)
