"""Weight-only quantization of an exported ONNX model with onnxruntime's own quantizers.

int4 uses ``MatMulNBitsQuantizer`` (round-to-nearest, per-block scales, optional zero points) so
the result runs on ORT's MatMulNBits kernels on CPU and CUDA and under onnxruntime-genai. The token
embedding becomes GatherBlockQuantized when the installed ORT has that kernel (probed, not assumed).

Tied embeddings: the exporter keeps one embedding tensor and transposes it at run time for the
LM head. The quantizer only takes MatMuls whose weight is an initializer, so we fold constant
Transposes first; the embedding (Gather) and the LM head (MatMul) are then quantized separately and
the float copy is dropped.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile

import numpy as np

from qwen_quant.errors import QuantError


@contextlib.contextmanager
def _quiet_ort_logs():
    """ORT's quantizer modules call logging.basicConfig at import (a root handler bound to the stderr of
    that moment) and log every node at INFO; undo the handler and raise their level to WARNING."""
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    try:
        yield
    finally:
        root.setLevel(level)
        for h in root.handlers[:]:
            if h not in before:
                root.removeHandler(h)
        for name in ("onnxruntime.quantization.matmul_nbits_quantizer", "onnxruntime.quantization"):
            logging.getLogger(name).setLevel(logging.WARNING)


def fold_constant_transposes(proto) -> int:
    """Replace Transpose(initializer) nodes with a transposed initializer; returns how many."""
    from onnx import numpy_helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    keep, folded = [], 0
    for node in graph.node:
        if node.op_type == "Transpose" and node.input[0] in inits:
            arr = numpy_helper.to_array(inits[node.input[0]])
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(np.transpose(arr, perm)), node.output[0]))
            folded += 1
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    return folded


def drop_unused_initializers(proto) -> None:
    graph = proto.graph
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


@functools.lru_cache(maxsize=None)
def ort_has_gather_block_quantized() -> bool:
    """Whether this onnxruntime can run com.microsoft.GatherBlockQuantized (int4 data) on CPU."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    data = helper.make_tensor("d", TensorProto.UINT4, [4, 32], np.zeros(64, np.uint8).tobytes(), raw=True)
    scales = helper.make_tensor("s", TensorProto.FLOAT, [4, 1], np.ones(4, np.float32))
    node = helper.make_node("GatherBlockQuantized", ["d", "i", "s"], ["y"], domain="com.microsoft",
                            gather_axis=0, quantize_axis=1, block_size=32)
    graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("i", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [data, scales])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        sess.run(None, {"i": np.array([1], np.int64)})
        return True
    except Exception:
        return False


def quantize_int4(proto, block_size: int = 32, symmetric: bool = True, embeddings: bool = True,
                  accuracy_level: int | None = None):
    """int4 weight-only quantization of every constant-weight MatMul (and the embedding Gather)."""
    with _quiet_ort_logs():
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    fold_constant_transposes(proto)
    drop_unused_initializers(proto)
    ops = ("MatMul", "Gather") if embeddings and ort_has_gather_block_quantized() else ("MatMul",)
    quant = MatMulNBitsQuantizer(proto, bits=4, block_size=block_size, is_symmetric=symmetric,
                                 accuracy_level=accuracy_level, op_types_to_quantize=ops,
                                 quant_axes=(("MatMul", 0), ("Gather", 1)))
    quant.process()
    out = quant.model.model
    drop_unused_initializers(out)
    if not any(n.op_type == "MatMulNBits" for n in out.graph.node):
        raise QuantError("int4 quantization found no MatMul with a constant weight; the export graph is not what "
                         "qwen-quant expects, rerun without --int4 and report the model")
    return out


def quantize_int8(proto):
    """Dynamic int8: per-channel int8 MatMul weights (activations quantized at run time) and an int8
    embedding. Measured on the tied fixture on 2 CPU cores: prefill 2.5x and decode 1.6x faster than
    fp32, half the size, top-1 agreement ~0.98; so it is offered (int4 MatMulNBits is smaller still).

    Weights use ``reduce_range`` (7-bit): onnxruntime's U8S8 kernels on x86 CPUs without VNNI (AVX2-only,
    e.g. many AMD EPYC hosts) use VPMADDUBSW, whose int16 intermediate saturates with full-range int8
    weights. Measured on a random 2-layer model on an AVX2-only EPYC: top-1 vs fp32 fell to 0.63 with
    full-range weights; the artifact must serve correctly on whatever CPU it lands on, so we give up
    one bit of weight precision everywhere, as onnxruntime's docs advise for non-VNNI machines."""
    import onnx
    with _quiet_ort_logs():
        from onnxruntime.quantization import QuantType, quantize_dynamic
    fold_constant_transposes(proto)
    drop_unused_initializers(proto)
    from qwen_quant.export.onnx import initializer_bytes

    big = initializer_bytes(proto) > 1_500_000_000
    with tempfile.TemporaryDirectory() as d:
        dst = os.path.join(d, "out.onnx")
        # ORT rejects an in-memory ModelProto above 2 GiB, so big models go through a file.
        src = proto
        if big:
            src = os.path.join(d, "in.onnx")
            onnx.save_model(proto, src, save_as_external_data=True, location="in.onnx.data")
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                         op_types_to_quantize=["MatMul", "Gather"], use_external_data_format=big)
        return onnx.load(dst)


def summary(proto) -> dict[str, int]:
    """Op counts of interest, for the export log and tests."""
    from collections import Counter

    c = Counter(n.op_type for n in proto.graph.node)
    return {k: c[k] for k in ("MatMul", "MatMulNBits", "Gather", "GatherBlockQuantized", "DynamicQuantizeMatMul",
                              "MatMulInteger") if c[k]}
