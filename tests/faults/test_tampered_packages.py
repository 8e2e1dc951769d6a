"""Tampered model packages: each is refused at load with an `InputError` naming the file and the
field, and no file outside the package is opened, by Python or by ONNX Runtime and tokenizers.

Each case copies a real exported package (the `lm_package`, `classifier_package` and
`chat_package` fixtures) and changes one thing an attacker or a broken copy could change.
"No file outside opened" is watched with inotify on the directories around the package: the
kernel reports every open by this process, including those ONNX Runtime (C++) and tokenizers
(Rust) make, which a Python audit hook never sees, and atime is not updated reliably (relatime).
Every case ends by opening its outside target itself, to show the watch was live.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import yaml
from onnx import numpy_helper

from gptcore.errors import InputError
from gptcore.runtime import OnnxClassifier, OnnxLM, load_model, resolve_model_uri
from gptcore.runtime.package import MAX_META_BYTES, MAX_TOKENIZER_BYTES

IN_ACCESS, IN_OPEN, IN_ISDIR = 0x1, 0x20, 0x40000000
EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then the name)


class OpenWatch:
    """The names of the files opened or read in `directories` (not below them) since it started."""

    def __init__(self, *directories: Path):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        for directory in directories:
            assert self.libc.inotify_add_watch(self.fd, bytes(directory), IN_OPEN | IN_ACCESS) >= 0

    def opened(self) -> set[str]:
        names, data = set(), b""
        while True:
            try:
                data += os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
        offset = 0
        while offset < len(data):
            _, mask, _, length = EVENT.unpack_from(data, offset)
            name = data[offset + EVENT.size : offset + EVENT.size + length].rstrip(b"\0").decode()
            if name and not mask & IN_ISDIR:
                names.add(name)
            offset += EVENT.size + length
        return names

    def close(self) -> None:
        os.close(self.fd)


def write_meta(pkg: Path, **changes) -> None:
    meta = json.loads((pkg / "gptcore_model.json").read_text())
    (pkg / "gptcore_model.json").write_text(json.dumps(meta | changes))


def meta_of(pkg: Path) -> dict:
    return json.loads((pkg / "gptcore_model.json").read_text())


def only_fp32(pkg: Path) -> None:
    """Drop the precision variants, so a swapped model.onnx is the package's one graph."""
    write_meta(pkg, variants={"fp32": meta_of(pkg)["variants"]["fp32"]})


def externalise(graph: Path, location: str, data_file: Path, in_constant: bool = False) -> None:
    """Move the graph's largest initializer's bytes to `data_file`, named as `location`; with
    `in_constant`, into a Constant node instead (a tensor held by an attribute, not an initializer)."""
    model = onnx.load(graph)
    tensor = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    if in_constant:
        model.graph.node.insert(0, onnx.helper.make_node("Constant", [], ["tampered"], value=tensor))
        tensor = model.graph.node[0].attribute[0].t
    data_file.write_bytes(numpy_helper.to_array(tensor).tobytes())
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(data_file.stat().st_size))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    onnx.save(model, graph)


def mlflow_dir(root: Path, package_path: str) -> Path:
    """An MLflow model directory whose pyfunc artifact `package` is at `package_path`."""
    model = root / "model"
    model.mkdir()
    mlmodel = {"flavors": {"python_function": {"artifacts": {"package": {"path": package_path}}}}}
    (model / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    return model


# Each case: (fixture, tamper(pkg, outside) -> (what to load, the outside file it aims at), load
# arguments, a pattern the message must match: the file and the field). `outside` is the
# directory holding the package: what tampering puts there is outside the package.
Tamper = Callable[[Path, Path], tuple[Path, str]]


def variant_up(pkg: Path, outside: Path):
    shutil.copy(pkg / "model.int8.onnx", outside / "secret.onnx")
    write_meta(pkg, variants=meta_of(pkg)["variants"] | {"int8": {"file": "../secret.onnx"}})
    return pkg, "secret.onnx"


def variant_absolute(pkg: Path, outside: Path):
    shutil.copy(pkg / "model.int8.onnx", outside / "secret.onnx")
    write_meta(pkg, variants=meta_of(pkg)["variants"] | {"int8": {"file": str(outside / "secret.onnx")}})
    return pkg, "secret.onnx"


def variant_symlink(pkg: Path, outside: Path):
    (pkg / "model.int8.onnx").rename(outside / "secret.onnx")
    (pkg / "model.int8.onnx").symlink_to("../secret.onnx")
    return pkg, "secret.onnx"


def graph_symlink(pkg: Path, outside: Path):
    (pkg / "model.onnx").rename(outside / "secret.onnx")
    (pkg / "model.onnx").symlink_to(outside / "secret.onnx")
    return pkg, "secret.onnx"


def external_data_up(pkg: Path, outside: Path):
    externalise(pkg / "model.onnx", "../weights.bin", outside / "weights.bin")
    return pkg, "weights.bin"


def external_data_absolute(pkg: Path, outside: Path):
    externalise(pkg / "model.onnx", str(outside / "weights.bin"), outside / "weights.bin")
    return pkg, "weights.bin"


def external_data_symlink(pkg: Path, outside: Path):
    externalise(pkg / "model.onnx", "weights.bin", outside / "weights.bin")
    (pkg / "weights.bin").symlink_to(outside / "weights.bin")
    return pkg, "weights.bin"


def external_data_in_constant(pkg: Path, outside: Path):
    externalise(pkg / "model.onnx", "../weights.bin", outside / "weights.bin", in_constant=True)
    return pkg, "weights.bin"


def tokenizer_symlink(pkg: Path, outside: Path):
    (pkg / "tokenizer.json").rename(outside / "secret_tokenizer.json")
    (pkg / "tokenizer.json").symlink_to("../secret_tokenizer.json")
    return pkg, "secret_tokenizer.json"


def mlmodel_up(pkg: Path, outside: Path):
    shutil.copytree(pkg, outside / "secret_pkg")
    return mlflow_dir(pkg, "../../secret_pkg"), "secret_pkg/model.onnx"


def mlmodel_absolute(pkg: Path, outside: Path):
    shutil.copytree(pkg, outside / "secret_pkg")
    return mlflow_dir(pkg, str(outside / "secret_pkg")), "secret_pkg/model.onnx"


def oversize_description(pkg: Path, outside: Path):
    write_meta(pkg, notes="x" * (MAX_META_BYTES + 1))
    return pkg, ""


def oversize_tokenizer(pkg: Path, outside: Path):
    tokenizer = json.loads((pkg / "tokenizer.json").read_text())
    (pkg / "tokenizer.json").write_text(json.dumps(tokenizer | {"padding": None, "notes": "x" * MAX_TOKENIZER_BYTES}))
    return pkg, ""


def meta_change(**changes) -> Tamper:
    def tamper(pkg: Path, outside: Path):
        write_meta(pkg, **changes)
        return pkg, ""

    return tamper


def labels_added(pkg: Path, outside: Path):
    write_meta(pkg, labels=[*meta_of(pkg)["labels"], "forged"])
    return pkg, ""


def graph_of(source: str) -> Tamper:
    """model.onnx replaced by another package's graph (same layers and heads, another vocabulary)."""

    def tamper(pkg: Path, outside: Path):
        shutil.copy(pkg.parent / source / "model.onnx", pkg / "model.onnx")
        only_fp32(pkg)
        return pkg, ""

    return tamper


def truncated_graph(pkg: Path, outside: Path):
    data = (pkg / "model.onnx").read_bytes()
    (pkg / "model.onnx").write_bytes(data[: len(data) // 2])
    return pkg, ""


CASES = {
    # files named by the package, leading out of it
    "variant-file-dotdot": ("lm_package", variant_up, {"variant": "int8"}, r"gptcore_model\.json.*'variants'"),
    "variant-file-absolute": ("lm_package", variant_absolute, {"variant": "int8"}, r"gptcore_model\.json.*'variants'"),
    "variant-symlink-out": ("lm_package", variant_symlink, {}, r"'variants\.int8\.file'.*outside /"),
    "graph-symlink-out": ("classifier_package", graph_symlink, {}, r"model\.onnx.*outside /"),
    "external-data-dotdot": ("lm_package", external_data_up, {}, r"model\.onnx: external data location.*outside"),
    "external-data-absolute": ("lm_package", external_data_absolute, {}, r"model\.onnx: external data location"),
    "external-data-symlink-out": ("classifier_package", external_data_symlink, {}, r"external data location.*outside"),
    "external-data-in-constant": ("lm_package", external_data_in_constant, {}, r"external data location.*outside"),
    "tokenizer-symlink-out": ("chat_package", tokenizer_symlink, {}, r"tokenizer\.json.*outside /"),
    "mlmodel-path-dotdot": ("lm_package", mlmodel_up, {}, r"MLmodel: field 'flavors\.python_function\.artifacts"),
    "mlmodel-path-absolute": ("lm_package", mlmodel_absolute, {}, r"MLmodel: field .*not a relative path inside"),
    # sizes
    "oversize-description": ("lm_package", oversize_description, {}, r"gptcore_model\.json: larger than 1048576"),
    "oversize-tokenizer": ("lm_package", oversize_tokenizer, {}, r"tokenizer\.json: larger than"),
    # the description against itself, the tokenizer and the graph
    "unknown-format-version": ("lm_package", meta_change(format_version=4), {}, r"gptcore_model\.json: format_vers"),
    "format-2-on-format-3-graph": ("lm_package", meta_change(format_version=2), {}, r"'format_version' 2.*attention"),
    "n-layer-beyond-graph": ("lm_package", meta_change(n_layer=3), {}, r"model\.onnx.*'n_layer' 3.*past_key_2"),
    "n-layer-short-of-graph": ("chat_package", meta_change(n_layer=1), {}, r"'n_layer' 1.*unexpected.*past_key_1"),
    "n-head-against-cache": ("lm_package", meta_change(n_head=4, head_dim=8), {}, r"'past_key_0'.*'n_head'"),
    "vocab-against-tokenizer": ("lm_package", meta_change(vocab_size=299), {}, r"tokenizer\.json: holds 300.*vocab"),
    "vocab-against-logits": ("lm_package", graph_of("chat"), {}, r"model\.onnx.*'logits'.*'vocab_size'"),
    "chat-with-lm-graph": ("chat_package", graph_of("lm"), {}, r"model\.onnx.*'logits'.*'vocab_size'"),
    "labels-against-logits": ("classifier_package", labels_added, {}, r"model\.onnx.*'logits'.*'labels'"),
    "eos-outside-vocab": ("lm_package", meta_change(eos_token_id=300), {}, r"gptcore_model\.json: field 'eos_token"),
    "block-size-absurd": ("lm_package", meta_change(block_size=1 << 40), {}, r"gptcore_model\.json: field 'block"),
    "truncated-graph": ("lm_package", truncated_graph, {}, r"model\.onnx: not a readable ONNX graph"),
}


@pytest.fixture
def packages(lm_package, classifier_package, chat_package) -> dict[str, Path]:
    return {
        "lm_package": Path(lm_package.package_dir),
        "classifier_package": Path(classifier_package.package_dir),
        "chat_package": Path(chat_package.package_dir),
    }


SHORT_NAMES = {"lm_package": "lm", "classifier_package": "clf", "chat_package": "chat"}


def copy_package(packages: dict[str, Path], fixture: str, tmp_path: Path) -> Path:
    """A private copy of the fixture's package in tmp_path/around/, beside copies of the others
    (for the cases that swap graphs); tampering puts what lies outside the package in `around`."""
    around = tmp_path / "around"
    for name, source in packages.items():
        shutil.copytree(source, around / SHORT_NAMES[name])
    return around / SHORT_NAMES[fixture]


@pytest.mark.parametrize("case", list(CASES))
def test_a_tampered_package_is_refused_at_load_and_nothing_outside_is_opened(case, packages, tmp_path):
    fixture, tamper, load_args, message = CASES[case]
    pkg = copy_package(packages, fixture, tmp_path)
    around = pkg.parent
    target, aimed_at = tamper(pkg, around)
    watched = [around] + [p for p in around.iterdir() if p.is_dir() and not p.is_symlink() and p != pkg]
    watch = OpenWatch(*watched)
    try:
        with pytest.raises(InputError, match=message):
            load_model(target, device="cpu", threads=1, **load_args)
        opened = watch.opened()
        assert opened == set(), f"opened outside the package: {opened}"
        if aimed_at:  # the watch sees an open of the target: it was live all along
            (around / aimed_at).read_bytes()
            assert Path(aimed_at).name in watch.opened()
    finally:
        watch.close()


def test_the_watch_sees_what_onnx_runtime_and_tokenizers_open(packages, tmp_path):
    """The instrument: opens made in C++ (ONNX Runtime) and Rust (tokenizers) are reported."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    shutil.copy(packages["lm_package"] / "model.onnx", tmp_path / "secret.onnx")
    shutil.copy(packages["lm_package"] / "tokenizer.json", tmp_path / "secret_tokenizer.json")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "tokenizer.json").symlink_to(tmp_path / "secret_tokenizer.json")
    watch = OpenWatch(tmp_path)
    try:
        ort.InferenceSession(str(tmp_path / "secret.onnx"), providers=["CPUExecutionProvider"])
        assert watch.opened() == {"secret.onnx"}
        Tokenizer.from_file(str(tmp_path / "elsewhere" / "tokenizer.json"))  # through a symlink, as a tamper would
        assert watch.opened() == {"secret_tokenizer.json"}
    finally:
        watch.close()


def test_a_fifo_in_the_package_is_refused_by_its_type_without_blocking(packages, tmp_path):
    """Opening a FIFO to read blocks until a writer comes: the check must look, never open."""
    pkg = copy_package(packages, "lm_package", tmp_path)
    (pkg / "model.int8.onnx").unlink()
    os.mkfifo(pkg / "model.int8.onnx")
    errors: list[BaseException] = []

    def load():
        try:
            load_model(pkg, device="cpu", threads=1, variant="int8")
        except BaseException as e:
            errors.append(e)

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    loader.join(timeout=30)
    if loader.is_alive():  # release the blocked reader before failing
        os.close(os.open(pkg / "model.int8.onnx", os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("the load opened the FIFO and blocked on it")
    assert len(errors) == 1 and isinstance(errors[0], InputError), errors
    assert "'variants.int8.file'" in str(errors[0]) and "not a regular file" in str(errors[0])


def test_external_data_inside_the_package_still_loads_and_gives_the_same_logits(packages, tmp_path):
    """What the export writes past 2 GB (model.onnx.data beside the graph) is not refused."""
    pkg = copy_package(packages, "lm_package", tmp_path)
    only_fp32(pkg)
    ids = np.array([[5, 6, 7, 8]], dtype=np.int64)
    before = load_model(pkg, device="cpu", threads=1).forward_logits(ids)
    externalise(pkg / "model.onnx", "model.onnx.data", pkg / "model.onnx.data")
    lm = load_model(pkg, device="cpu", threads=1)
    assert isinstance(lm, OnnxLM)
    np.testing.assert_array_equal(lm.forward_logits(ids), before)


def test_a_symlink_that_stays_inside_the_package_is_followed(packages, tmp_path):
    pkg = copy_package(packages, "classifier_package", tmp_path)
    (pkg / "model.onnx").rename(pkg / "graph.onnx")
    (pkg / "model.onnx").symlink_to("graph.onnx")
    assert isinstance(load_model(pkg, device="cpu", threads=1), OnnxClassifier)


@pytest.mark.parametrize("path", ["../secret_pkg", "/etc", "artifacts/../../secret_pkg"])
def test_resolving_an_mlflow_directory_refuses_a_package_path_leading_out(tmp_path, path):
    with pytest.raises(InputError, match=r"MLmodel: field 'flavors\.python_function\.artifacts\.package\.path'"):
        resolve_model_uri(mlflow_dir(tmp_path, path))


def test_resolving_an_mlflow_directory_finds_the_package_inside(tmp_path):
    model = mlflow_dir(tmp_path, "artifacts/package")
    assert resolve_model_uri(model) == model.resolve() / "artifacts" / "package"


def saved_pyfunc(package: Path, model: Path) -> Path:
    """The package saved as gptcore's pyfunc (as the registry logs it), without a registry."""
    import mlflow.pyfunc

    from gptcore.registry.register import PYFUNC_CODE

    mlflow.pyfunc.save_model(
        model, python_model=str(PYFUNC_CODE), artifacts={"package": str(package)}, pip_requirements=[]
    )
    return model


@pytest.mark.parametrize("path", ["../secret_pkg", "/etc", "artifacts/../../secret_pkg"])
def test_the_pyfunc_refuses_an_mlmodel_whose_package_path_leads_out(packages, tmp_path, path):
    import mlflow.pyfunc

    shutil.copytree(packages["classifier_package"], tmp_path / "secret_pkg")
    model = saved_pyfunc(packages["classifier_package"], tmp_path / "model")
    assert len(mlflow.pyfunc.load_model(str(model)).predict(pd.DataFrame({"text": ["the sea"]}))) == 1
    mlmodel = yaml.safe_load((model / "MLmodel").read_text())
    mlmodel["flavors"]["python_function"]["artifacts"]["package"]["path"] = path
    (model / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    watch = OpenWatch(tmp_path / "secret_pkg")
    try:
        with pytest.raises(InputError, match=r"MLmodel: field 'flavors\.python_function\.artifacts\.package\.path'"):
            mlflow.pyfunc.load_model(str(model))
        assert watch.opened() == set()
    finally:
        watch.close()


@pytest.fixture(scope="module")
def growing_cache_package(trained, tmp_path_factory) -> Path:
    """The tiny LM exported with the growing cache of format 2 (what the KV-cache benchmark compares)."""
    import functools

    from gptcore.config import ExportConfig
    from gptcore.export.lm import check_lm_parity, export_lm_graph
    from gptcore.export.package import write_package
    from gptcore.results import load_pretrained, load_tokenizer
    from gptcore.weights import load_lm

    gpt, meta = load_lm(load_pretrained(trained["pre"]).best_dir)
    cfg = ExportConfig(variants=[])
    val = np.arange(4 * gpt.cfg.block_size) % gpt.cfg.vocab_size
    out = tmp_path_factory.mktemp("growing") / "lm"
    write_package(
        out,
        "lm",
        lambda path: export_lm_graph(gpt, path, cfg.opset, fixed_cache=False),
        gpt,
        load_tokenizer(trained["tokenizer"]),
        Path(trained["tokenizer"]) / "tokenizer.json",
        meta | {"labels": []},
        cfg,
        functools.partial(check_lm_parity, gpt, val, cfg),
    )
    return out


def test_a_growing_cache_graph_is_described_as_format_2_and_refused_as_format_3(growing_cache_package, tmp_path):
    assert meta_of(growing_cache_package)["format_version"] == 2
    lm = load_model(growing_cache_package, device="cpu", threads=1)
    assert not lm.fixed_cache and len(lm.generate_ids([5, 6, 7], max_new_tokens=4, temperature=0.0)) == 4
    pkg = shutil.copytree(growing_cache_package, tmp_path / "lm")
    write_meta(pkg, format_version=3)
    with pytest.raises(InputError, match=r"'format_version' 3.*unexpected \['attention_mask'\]"):
        load_model(pkg, device="cpu", threads=1)
