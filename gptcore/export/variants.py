"""Graph optimisation and precision variants of an exported ONNX graph (no torch).

The dynamo exporter writes attention, LayerNorm and GELU as chains of primitive ops. ONNX
Runtime's own transformer optimizer (`onnxruntime.transformers.optimizer`) matches the
subgraphs of the older TorchScript exporter and fuses only LayerNorm and GELU here; the fusion
rules written for dynamo graphs live in onnxscript (`onnxscript.rewriter.ort_fusions`, which
targets the same ONNX Runtime contrib ops), and they also fuse attention:

    scaled_dot_product_attention -> com.microsoft.MultiHeadAttention
    residual Add + LayerNormalization -> com.microsoft.SkipLayerNormalization
    tanh-approximated GELU -> com.microsoft.FastGelu
    RMSNorm (with the residual Add before it) -> (Skip)SimplifiedLayerNormalization

Fusion only happens where a subgraph matches a rule exactly, so a model change can lose it
without any error: `fused_op_counts` reads the counts back, and tests pin them (the RMSNorm rule
matches only a mean over axis -1, which the exporter writes as a positive axis: `name_last_axis`
writes it back first). The fusion hands MultiHeadAttention its keys and values as (B, S, C), so
for a cache written in place it transposes the whole (B, H, W, D) buffer every step;
`attend_over_cache` gives MultiHeadAttention the buffer itself instead (its 4-D BNSH form), and
a decode step then copies nothing.

Variants, each a file of its own in the package:
    fp32  model.onnx       the optimised graph; must match PyTorch (the export's parity gate)
    fp16  model.fp16.onnx  weights and activations in float16 for CUDA (inputs, cache and logits
                           stay float32 at the graph's edge, so one runtime serves every variant)
    int8  model.int8.onnx  every MatMul, the tied LM head included, as MatMulNBits with 8-bit
                           symmetric weights in blocks of 32 and int8 compute (accuracy_level 4):
                           weights are quantised once, activations dynamically at run time
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np

log = logging.getLogger("gptcore.export")

VARIANT_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
# what a fused graph should hold, by the kind of subgraph the fusion replaced
FUSED_OPS = {
    "attention": ("MultiHeadAttention", "Attention", "GroupQueryAttention"),
    "layernorm": (
        "SkipLayerNormalization",
        "SkipSimplifiedLayerNormalization",
        "SimplifiedLayerNormalization",  # RMSNorm's, where no residual Add precedes it
    ),
    "gelu": ("FastGelu", "Gelu", "BiasGelu"),
}
INT8_BLOCK = 32


def optimize_graph(src: str | Path, dst: str | Path) -> dict[str, int]:
    """Fuse `src` for ONNX Runtime into `dst`; returns the fusions applied, by rule."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model = ir.load(str(src))
    last_axis = name_last_axis(model)
    model, applied = optimize_for_ort(model)
    ir.save(model, str(dst))
    applied["attend_over_cache"] = attend_over_cache(dst)
    applied["last_axis"] = last_axis
    return {rule: n for rule, n in applied.items() if n}


def name_last_axis(model) -> int:
    """Write each ReduceMean over the last axis as axis -1, the form the RMSNorm fusion matches
    (the exporter writes the axis as a positive number: 2 of a (B, T, C) input, 3 of the QK-norm's
    (B, T, H, D)); rewrites the onnx_ir `model` in place and returns the nodes it changed."""
    import onnx_ir as ir

    last = None
    changed = 0
    for node in model.graph:
        if node.op_type != "ReduceMean" or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        x, axes = node.inputs[0], node.inputs[1].const_value
        rank = len(x.shape) if x is not None and x.shape is not None else None
        if axes is None or rank is None or axes.numpy().tolist() != [rank - 1]:
            continue
        if last is None:
            last = ir.Value(name="gptcore_last_axis", const_value=ir.tensor(np.array([-1], np.int64)))
            model.graph.register_initializer(last)
        node.replace_input_with(1, last)
        changed += 1
    return changed


def attend_over_cache(path: str | Path) -> int:
    """Feed each MultiHeadAttention the cache buffer written in place (B, H, W, D) as its key and
    value, where the fusion feeds it Reshape(Transpose(buffer)) as (B, W, C): the same numbers,
    without a copy of the buffer. Rewrites `path`; returns the inputs rewired."""
    import onnx

    model = onnx.load(str(path))
    graph, outputs = model.graph, {o.name for o in model.graph.output}
    producer = {out: node for node in graph.node for out in node.output}
    rewired = 0
    for node in graph.node:
        if node.op_type != "MultiHeadAttention":
            continue
        for i in (1, 2):  # key, value
            reshape = producer.get(node.input[i])
            transpose = producer.get(reshape.input[0]) if reshape is not None and reshape.op_type == "Reshape" else None
            if transpose is None or transpose.op_type != "Transpose" or transpose.input[0] not in outputs:
                continue
            written = producer.get(transpose.input[0])
            perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
            if written is not None and written.op_type == "ScatterElements" and perm == [0, 2, 1, 3]:
                node.input[i] = transpose.input[0]
                rewired += 1
    if rewired:
        drop_unused(graph)
        onnx.save(model, str(path))
    return rewired


def drop_unused(graph) -> None:
    """Remove the nodes and initializers nothing reads any more (the transposes bypassed)."""
    while True:
        read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        unused = [node for node in graph.node if not any(out in read for out in node.output)]
        if not unused:
            break
        for node in unused:
            graph.node.remove(node)
    read = {name for node in graph.node for name in node.input}
    for init in [init for init in graph.initializer if init.name not in read]:
        graph.initializer.remove(init)


def fused_op_counts(path: str | Path) -> dict[str, int]:
    """How many fused attention, LayerNorm and GELU ops the graph in `path` holds."""
    import onnx

    ops = Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)
    return {kind: sum(ops[op] for op in names) for kind, names in FUSED_OPS.items()}


def convert_fp16(src: str | Path, dst: str | Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))


def untie_lm_head(model) -> None:
    """Give the LM head a MatMul of its own, with the embedding transposed as a new initializer.

    The fusion writes the tied head as FusedMatMul(h, wte, transB=1), which no quantizer takes;
    as a plain MatMul the largest matrix of a small-vocabulary-heavy model gets quantised too.
    """
    from onnx import helper, numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    for index, node in enumerate(model.graph.node):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "FusedMatMul" and attrs.get("transB") == 1 and node.input[1] in initializers:
            weight = numpy_helper.to_array(initializers[node.input[1]])
            transposed = numpy_helper.from_array(
                np.ascontiguousarray(weight.T * attrs.get("alpha", 1.0)), f"{node.input[1]}.T"
            )
            model.graph.initializer.append(transposed)
            plain = helper.make_node(
                "MatMul", [node.input[0], transposed.name], list(node.output), name=f"{node.name}.untied"
            )
            model.graph.node.remove(node)
            model.graph.node.insert(index, plain)


def quantize_int8(src: str | Path, dst: str | Path) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    untie_lm_head(model)
    quantizer = MatMulNBitsQuantizer(model, bits=8, block_size=INT8_BLOCK, is_symmetric=True, accuracy_level=4)
    level = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").level
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # a line per node
    try:
        quantizer.process()
    finally:
        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(level)
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)


BUILDERS = {"fp16": convert_fp16, "int8": quantize_int8}


def build_variant(variant: str, fp32_path: Path, package_dir: Path) -> Path:
    """Write `variant` of the optimised fp32 graph into the package; returns its path."""
    dst = package_dir / VARIANT_FILES[variant]
    BUILDERS[variant](fp32_path, dst)
    return dst
