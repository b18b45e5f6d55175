"""Optional ONNX Runtime variants of the exported encoders: offline graph optimisation and int8.

Both are opt-in (`karma export --optimize`, `--quantize int8`); the default bundle keeps the plain
fp32 graphs the exporter wrote. `make_variant` turns one fp32 ONNX file into a variant file:

* **int8** (`quantize_graph`): `onnxruntime.quantization.quantize_dynamic`, weights int8 (per
  output channel), activations quantised to uint8 at run time (one scale per tensor, i.e. per
  batch), for every MatMul/Gemm whose second input is a weight, except the decoder's MLP
  down-projections (`INT8_KEEP_FP32`: their inputs hold the LLM's activation outliers; quantising
  them drops SmolLM2's worst-case cosine to 0.96). ORT's dynamic quantiser has no Gemm kernel, so
  the item tower's Gemm nodes (2-D `nn.Linear`) are first rewritten as MatMul + Add
  (`gemm_to_matmul`, exact). The graph is pre-processed with `quant_pre_process` (shape inference +
  ORT basic optimisation), falling back to ONNX-only shape inference when ORT's symbolic shape
  inference cannot follow the graph. Attention's activation x activation MatMuls (QK^T, AV),
  embeddings (Gather), norms and the final L2 normalisation stay fp32. The inputs and outputs
  (names, dtypes, dynamic axes) are unchanged.
* **optimized** (`optimize_graph`): the graph as ONNX Runtime rewrites it at
  `ORT_ENABLE_EXTENDED` (constant folding, RMSNorm/GELU/MatMul fusions, and for int8 graphs the
  `MatMulIntegerToFloat` fusion), saved with `SessionOptions.optimized_model_filepath`. Not
  `ORT_ENABLE_ALL`: that level adds NCHWc layout transforms, and ORT itself warns the saved file
  "may contain hardware specific optimizations" for that level. An extended file contains
  `com.microsoft` contrib ops, so it runs on ONNX Runtime only (not other ONNX runtimes), is meant
  for the CPU execution provider it was optimised for, and should be loaded by an ORT at least as
  new as the one that wrote it (recorded in the manifest).

What they buy is measured, not assumed: `benchmarks/bench_export_variants.py` reports the
latency, the item throughput and HR@200 / NDCG@10 of all four variants of one checkpoint. Note that
a serving session already applies these optimisations online when it opens a graph (ORT's
default level is ENABLE_ALL), so an offline-optimised file mainly saves session start-up time.

Parity of a variant against PyTorch uses a documented tolerance: the fp32 1e-4 max-abs-diff for
`optimized` (the fusions are exact up to float rounding) and a cosine floor for int8: every h of a
real query (test/valid users' queries and histories, batch 1/3/8/32) and every item vector (the
catalog and random feature rows) must have cosine >= `INT8_MIN_COSINE` (0.99) with PyTorch's;
the random-query cases (uniformly random token ids over the whole vocabulary, random features)
only need `INT8_RANDOM_QUERY_MIN_COSINE` (0.95): such rows are off-distribution, and because
dynamic int8 picks one activation scale per batch, one of them degrades its whole batch
(SmolLM2: 0.976 worst random batch of 32 vs 0.993 worst real one). Both minima are recorded.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from karma.bundle import OnnxVariant
from karma.errors import KarmaError

log = logging.getLogger(__name__)

QUANTIZE_CHOICES = ("int8",)
OPTIMIZATION_LEVEL = "extended"
QUANT_OP_TYPES = ("MatMul",)  # Gemm is rewritten to MatMul + Add first (no dynamic Gemm kernel in ORT)
# int8 weight ranges tried at export, in order, until one meets the parity floor (see quantize_graph):
# 7-bit first (no u8*s8 saturation on CPUs without VNNI), then the full 8 bits (finer steps).
INT8_WEIGHT_RANGES = ("7-bit", "8-bit")
# MatMuls left in fp32 by default: the decoder MLP down-projections, whose inputs carry the LLM's
# activation outliers. Measured on SmolLM2-135M (4 layers): with them int8 the worst test user's h has
# cosine 0.961 with PyTorch (mean 0.984); kept fp32, 0.998 at batch 1 and 8 (mean 0.9995).
INT8_KEEP_FP32 = ("mlp/down_proj",)
INT8_MIN_COSINE = 0.99  # every real query (test/valid users) and every item vector
INT8_RANDOM_QUERY_MIN_COSINE = 0.95  # random token ids + random features: a broken-graph guard, not a quality bar
INT8_PARITY_BATCHES = (1, 3, 8, 32)  # 32 = the service's default max batch: dynamic int8 scales span a batch
FP32_TOLERANCE = 1e-4


def variant_of(optimize: bool = False, quantize: str | None = None) -> OnnxVariant:
    """The manifest record for a requested variant (details are filled in by `make_variant`)."""
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise KarmaError(f"unknown --quantize {quantize!r}; use one of {list(QUANTIZE_CHOICES)}")
    return OnnxVariant(optimized=bool(optimize), quantized=quantize)


def parity_criterion(variant: OnnxVariant, tolerance: float = FP32_TOLERANCE) -> dict[str, Any]:
    """How a variant is judged against PyTorch: max abs diff (fp32, optimized) or min cosine (int8).

    int8 parity also runs at batch 32: dynamic quantisation picks one activation scale per tensor,
    i.e. per *batch*, so a row's output depends on what it is batched with.
    """
    if variant.quantized:
        return {
            "metric": "min_cosine",
            "min_cosine": INT8_MIN_COSINE,
            "random_query_min_cosine": INT8_RANDOM_QUERY_MIN_COSINE,
            "batch_sizes": INT8_PARITY_BATCHES,
        }
    return {"metric": "max_abs_diff", "tolerance": tolerance}


# ---- graph optimisation -------------------------------------------------------------------------


def _ort_level(level: str) -> Any:
    import onnxruntime as ort

    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }
    if level not in levels:
        raise KarmaError(f"optimisation level {level!r}: use basic or extended (all is hardware specific)")
    return levels[level]


def optimize_graph(src: Path, dst: Path, level: str = OPTIMIZATION_LEVEL) -> dict[str, Any]:
    """Write `src` as ONNX Runtime optimises it for the CPU execution provider at `level`."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = _ort_level(level)
    options.optimized_model_filepath = str(dst)
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    started = time.perf_counter()
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    if not Path(dst).is_file():
        raise KarmaError(f"ONNX Runtime did not write the optimised graph of {src}")
    return {"level": level, "seconds": round(time.perf_counter() - started, 3)}


# ---- int8 ---------------------------------------------------------------------------------------


def _attr(node: Any, name: str, default: Any) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def gemm_to_matmul(model: Any) -> int:
    """Rewrite `Gemm(A, W[, b])` with a weight W as `MatMul(A, W') [+ b]` in place; returns the count.

    Only the exact cases: alpha = beta = 1, transA = 0, W (and b) initializers. Numerically the same
    computation; it lets the dynamic quantiser (which has no Gemm kernel) quantise the weight.
    """
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    new_nodes, rewritten = [], 0
    for node in graph.node:
        ok = (
            node.op_type == "Gemm"
            and node.domain in ("", "ai.onnx")
            and len(node.input) >= 2
            and node.input[1] in inits
            and (len(node.input) < 3 or not node.input[2] or node.input[2] in inits)
            and _attr(node, "alpha", 1.0) == 1.0
            and _attr(node, "beta", 1.0) == 1.0
            and _attr(node, "transA", 0) == 0
        )
        if not ok:
            new_nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        if _attr(node, "transB", 0):
            weight = weight.T
        w_name = f"{node.input[1]}__matmul"
        if w_name not in inits:
            inits[w_name] = numpy_helper.from_array(np.ascontiguousarray(weight), w_name)
            graph.initializer.append(inits[w_name])
        has_bias = len(node.input) >= 3 and bool(node.input[2])
        base = node.name or f"gemm{rewritten}"
        product = f"{node.output[0]}__matmul" if has_bias else node.output[0]
        new_nodes.append(onnx.helper.make_node("MatMul", [node.input[0], w_name], [product], name=f"{base}/MatMul"))
        if has_bias:
            new_nodes.append(
                onnx.helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{base}/Add")
            )
        rewritten += 1
    if rewritten:
        del graph.node[:]
        graph.node.extend(new_nodes)
        used = {name for n in graph.node for name in n.input}
        keep = [i for i in graph.initializer if i.name in used]
        del graph.initializer[:]
        graph.initializer.extend(keep)
    return rewritten


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """The ORT quantiser logs one INFO line per tensor on the root logger; keep it to warnings."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


def _preprocess(src: Path, dst: Path) -> str:
    """`quant_pre_process`: symbolic + ONNX shape inference and ORT basic optimisation."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst))
        return "quant_pre_process"
    except Exception as exc:  # symbolic shape inference does not follow every traced graph
        log.info("quant_pre_process with symbolic shape inference failed (%s); retrying without it", exc)
    quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    return "quant_pre_process (skip_symbolic_shape)"


def _normalise(name: str) -> str:
    return name.replace(".", "/")


def matmuls_matching(model: Any, patterns: Sequence[str]) -> list[str]:
    """Names of MatMul nodes whose node name or an input name contains one of `patterns`.

    Names are compared with '.' read as '/', so "mlp/down_proj" matches both the TorchScript
    exporter's node `/decoder/layers.0/mlp/down_proj/MatMul` and a `decoder.layers.0.mlp.down_proj.weight`
    initializer (the dynamo exporter's naming).
    """
    wanted = [_normalise(p) for p in patterns if p]
    out = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or not wanted:
            continue
        names = [_normalise(n) for n in (node.name, *node.input)]
        if any(p in n for p in wanted for n in names):
            out.append(node.name)
    return out


def quantize_graph(
    src: Path,
    dst: Path,
    per_channel: bool = True,
    preprocess: bool = True,
    keep_fp32: Sequence[str] = INT8_KEEP_FP32,
    weight_range: str = INT8_WEIGHT_RANGES[0],
) -> dict[str, Any]:
    """Dynamic int8 quantisation of `src` (weights int8, activations uint8 at run time) into `dst`.

    MatMuls matching `keep_fp32` (see `matmuls_matching`) stay fp32. `weight_range`: "7-bit"
    (`reduce_range`) or "8-bit". On CPUs without VNNI (AVX2 only), ONNX Runtime's u8·s8 kernels add
    pairs of products in 16 bits, which can saturate with 8-bit weights; 7 bits cannot saturate but
    halve the weight resolution. Neither wins everywhere (AVX2-only EPYC, min cosine vs PyTorch):
    the tiny test model 0.979 with 8 bits (saturation) vs 0.9997 with 7; SmolLM2 (4 layers) on
    random-token queries 0.996 with 8 bits vs 0.942 with 7. `export_checkpoint` tries both.
    """
    if weight_range not in INT8_WEIGHT_RANGES:
        raise KarmaError(f"int8 weight_range must be one of {INT8_WEIGHT_RANGES}, got {weight_range!r}")
    reduce_range = weight_range == "7-bit"
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="karma-quant-") as tmp, _quiet_quantizer():
        model = onnx.load(str(src))
        gemms = gemm_to_matmul(model)
        staged = Path(tmp) / "matmul.onnx"
        onnx.save(model, str(staged))
        how = "none"
        if preprocess:
            pre = Path(tmp) / "pre.onnx"
            how = _preprocess(staged, pre)
            staged = pre
        excluded = matmuls_matching(onnx.load(str(staged), load_external_data=False), keep_fp32)
        for name in excluded:
            if not name:
                raise KarmaError(f"{src}: an unnamed MatMul matches {list(keep_fp32)}; cannot exclude it by name")
        quantize_dynamic(
            str(staged),
            str(dst),
            op_types_to_quantize=list(QUANT_OP_TYPES),
            per_channel=per_channel,
            reduce_range=reduce_range,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded,
            extra_options={"MatMulConstBOnly": True},
        )
    quantized = onnx.load(str(dst), load_external_data=False)
    ops = Counter(n.op_type for n in quantized.graph.node)
    int8 = [i for i in quantized.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    if not int8:
        raise KarmaError(f"int8 quantisation of {src} quantised nothing (no MatMul with a weight)")
    return {
        "method": "onnxruntime.quantization.quantize_dynamic",
        "weight_type": f"int8 (symmetric, {weight_range} range)",
        "weight_range": weight_range,
        "activation_type": "uint8 (dynamic, per tensor, at run time)",
        "per_channel": per_channel,
        "op_types": list(QUANT_OP_TYPES),
        "gemm_rewritten_to_matmul": gemms,
        "preprocess": how,
        "kept_fp32_patterns": list(keep_fp32),
        "kept_fp32_matmuls": len(excluded),
        "quantized_matmuls": int(ops.get("MatMulInteger", 0)),
        "fp32_matmuls_left": int(ops.get("MatMul", 0)),
        "int8_weight_elements": int(sum(int(np.prod(i.dims)) for i in int8)),
        "seconds": round(time.perf_counter() - started, 3),
    }


# ---- a variant ------------------------------------------------------------------------------------


def make_variant(
    src: Path,
    dst: Path,
    variant: OnnxVariant,
    keep_fp32: Sequence[str] = INT8_KEEP_FP32,
    weight_range: str = INT8_WEIGHT_RANGES[0],
) -> OnnxVariant:
    """Write the `variant` of the fp32 graph `src` to `dst`; returns the variant with its details.

    optimized+int8 = quantise the fp32 graph, then optimise the quantised one (so the offline file
    holds the fused int8 kernels the serving session would otherwise build at start-up).
    """
    import onnxruntime as ort

    src, dst = Path(src), Path(dst)
    if not variant.optimized and not variant.quantized:
        if src != dst:
            shutil.copyfile(src, dst)
        return variant
    details: dict[str, Any] = {"onnxruntime_version": ort.__version__}
    with tempfile.TemporaryDirectory(prefix="karma-variant-") as tmp:
        current = src
        if variant.quantized:
            target = dst if not variant.optimized else Path(tmp) / "int8.onnx"
            details["quantization"] = quantize_graph(current, target, keep_fp32=keep_fp32, weight_range=weight_range)
            current = target
        if variant.optimized:
            optimize_graph(current, dst, OPTIMIZATION_LEVEL)
            details["optimization_level"] = OPTIMIZATION_LEVEL
    return variant.model_copy(update=details)


def variant_files(
    directory: Path,
    names: list[str],
    variant: OnnxVariant,
    keep_fp32: Sequence[str] = INT8_KEEP_FP32,
    weight_range: str = INT8_WEIGHT_RANGES[0],
) -> dict[str, OnnxVariant]:
    """Replace each fp32 `directory/name` by its variant, in place; returns name -> variant details."""
    out = {}
    for name in names:
        path = Path(directory) / name
        tmp = path.with_name(f"{path.stem}.{variant.name}.tmp.onnx")
        try:
            out[name] = make_variant(path, tmp, variant, keep_fp32, weight_range)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
    return out
