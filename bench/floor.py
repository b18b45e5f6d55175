"""The query encoder's FLOP floor on this CPU, and how far ONNX Runtime runs above it (`karma bench --parts floor`).

floor(batch) = FLOPs of that batch ÷ this CPU's sustained GEMM rate at the encoder's own matrix shapes.

- FLOPs: `torch.utils.flop_counter.FlopCounterMode` on the served PyTorch query tower (the training
  checkpoint's, checked against the bundle's ONNX graph as the naive baseline checks it), fed the very
  arrays the service builds (`Engine.feeds`: the bundle's tokenizer, features and padding) for the
  benchmark's request bodies. The counter counts matmuls (every Linear, and attention where it is
  plain matmuls); a fused attention kernel (SDPA on CPU), norms, rotary and activations count 0, so
  the floor treats them as free: it is optimistic, and a few % of the gap to it is that work.
- GEMM rate: every MatMul of the query graph whose right-hand side is a weight (an initializer) is
  timed alone, as a one-node ONNX graph in ONNX Runtime (its MLAS kernels; at 1 and at 2 intra-op
  threads, one rate per thread count), at M = batch x the sequence the tower runs (query tokens +
  history items + [EMB]; the feature projection and the output layer really run at fewer rows). The
  rate is their FLOPs over their time, weighted as often as each shape occurs in the graph. int8: the
  same shapes through `MatMulInteger` (uint8 x int8 -> int32, the kernel a dynamically quantised
  graph runs), so int8 floor = FLOPs / that rate.
- Measured: the bundle's query session (`Bundle.open_sessions`, 1 or 2 intra-op threads) per batch,
  median of repeated runs over distinct batches, and PyTorch eager (1 thread) for reference; with
  `int8_bundle` (the same checkpoint exported with `--quantize int8`), its session too, against its
  own floor: the MatMuls it keeps in fp32 (the MLP down-projections by default) at the fp32 rate, the
  rest at the int8 rate.

The service's typical batch (the mean batch of the serving part at its capacity rate) is added to
the batch sizes when that part ran first.
"""

from __future__ import annotations

import itertools
import logging
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("karma.bench")

REPEAT_S = 1.0  # seconds of repeated runs per measured case (at least 3 runs)
INT8_MIN_COSINE = 0.95  # an --int8-bundle whose h_t is further than this from the fp32 bundle's is another model


FP32_OPS = ("MatMul", "Gemm")
INT8_OPS = ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat")  # what quantize_dynamic emits


def weight_matmul_shapes(path: Path, ops: tuple[str, ...] = FP32_OPS) -> Counter[tuple[int, int]]:
    """(K, N) of every `ops` node in the graph whose second input is a 2-D initializer, with its count."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    dims = {t.name: tuple(t.dims) for t in model.graph.initializer}
    shapes: Counter[tuple[int, int]] = Counter()
    for node in model.graph.node:
        if node.op_type in ops and len(node.input) > 1 and len(dims.get(node.input[1], ())) == 2:
            k, n = dims[node.input[1]]
            if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
                k, n = n, k
            shapes[(int(k), int(n))] += 1
    return shapes


def fp32_share(path: Path) -> float:
    """Share of a graph's weight-GEMM FLOPs that still run in fp32 (an int8 export keeps some MatMuls fp32)."""
    fp32 = sum(k * n * c for (k, n), c in weight_matmul_shapes(path, FP32_OPS).items())
    int8 = sum(k * n * c for (k, n), c in weight_matmul_shapes(path, INT8_OPS).items())
    return fp32 / (fp32 + int8) if fp32 + int8 else 1.0


def _timed(run: Any, min_s: float = REPEAT_S, min_runs: int = 3) -> float:
    """Median seconds of `run()` over repeats filling `min_s` (one untimed warm-up call first)."""
    run()
    times: list[float] = []
    deadline = time.perf_counter() + min_s
    while len(times) < min_runs or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _cycled(encode: Any, batches: list[dict[str, np.ndarray]]) -> Any:
    """A no-argument call that encodes the next of `batches` each time (distinct inputs, no cache effects)."""
    upcoming = itertools.cycle(batches)
    return lambda: encode(next(upcoming))


def _matmul_session(k: int, n: int, int8: bool, threads: int) -> Any:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if int8:
        weight = numpy_helper.from_array(rng.integers(-127, 128, (k, n), dtype=np.int8), "B")
        inputs = [helper.make_tensor_value_info("A", TensorProto.UINT8, ["M", k])]
        node = helper.make_node("MatMulInteger", ["A", "B"], ["Y"])
        out = helper.make_tensor_value_info("Y", TensorProto.INT32, ["M", n])
    else:
        weight = numpy_helper.from_array((rng.standard_normal((k, n)) * 0.02).astype(np.float32), "B")
        inputs = [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])]
        node = helper.make_node("MatMul", ["A", "B"], ["Y"])
        out = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])
    graph = helper.make_graph([node], "gemm", inputs, [out], initializer=[weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def gemm_rate(shapes: Counter[tuple[int, int]], m: int, int8: bool = False, threads: int = 1) -> dict[str, Any]:
    """Sustained FLOP/s of ORT's MatMul (or MatMulInteger) at M = `m` over the graph's weight shapes."""
    rng = np.random.default_rng(1)
    flops = seconds = 0.0
    per_shape = []
    for (k, n), count in sorted(shapes.items()):
        session = _matmul_session(k, n, int8, threads)
        a = rng.integers(0, 256, (m, k), dtype=np.uint8) if int8 else rng.standard_normal((m, k)).astype(np.float32)
        t = _timed(lambda s=session, a=a: s.run(None, {"A": a}), min_s=0.3)
        f = 2.0 * m * k * n
        per_shape.append({"k": k, "n": n, "count": count, "gflop_s": f / t / 1e9})
        flops += count * f
        seconds += count * t
    return {"m": m, "int8": int8, "threads": threads, "gflop_s": flops / seconds / 1e9, "shapes": per_shape}


def counted_flops(tower: Any, feeds: dict[str, np.ndarray]) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        tower(**{name: torch.from_numpy(value) for name, value in feeds.items()})
    return int(counter.get_total_flops())


def sequence_tokens(feeds: dict[str, np.ndarray]) -> int:
    """Tokens the tower runs per request: query tokens + history items + [EMB]."""
    from karma.contracts import HIST_MASK_INPUT, QUERY_IDS_INPUT

    return int(feeds[QUERY_IDS_INPUT].shape[1] + feeds[HIST_MASK_INPUT].shape[1] + 1)


def run_floor(
    bundle_dir: Path,
    checkpoint: Path,
    bodies: list[dict],
    batch_sizes: list[int],
    threads: tuple[int, ...] = (1, 2),
    int8_bundle: Path | None = None,
) -> dict[str, Any]:
    """Floor vs measured encoder time per batch size (see the module docstring); a dict for bench.json."""
    import torch

    from bench.naive import TorchQueryEncoder, check_parity
    from karma.bundle import QUERY_ENCODER_FILE, load_bundle
    from service.engine import Engine

    torch.set_num_threads(1)
    bundle = load_bundle(bundle_dir)
    sessions = {t: bundle.open_sessions(intra_op_threads=t, inter_op_threads=1) for t in threads}
    engine = Engine(bundle, sessions[threads[0]])
    tower = TorchQueryEncoder(checkpoint, bundle.manifest.dims.feature_dim)
    check_parity(engine, tower, sessions[threads[0]], f"checkpoint {checkpoint}", f"bundle {bundle_dir}")
    int8_fp32 = int8_sessions = None
    if int8_bundle is not None:  # the same model quantised: close to the fp32 graph, never another model
        quantised = load_bundle(int8_bundle)
        int8_fp32 = fp32_share(quantised.path(QUERY_ENCODER_FILE))
        int8_sessions = quantised.open_sessions(intra_op_threads=1, inter_op_threads=1)
        check_parity(engine, int8_sessions, sessions[threads[0]], f"int8 bundle {int8_bundle}",
                     f"bundle {bundle_dir}", min_cosine=INT8_MIN_COSINE)  # fmt: skip
    shapes = weight_matmul_shapes(bundle.path(QUERY_ENCODER_FILE))
    log.info("floor: %d weight MatMuls of %d shapes in the query graph", sum(shapes.values()), len(shapes))

    def batch_feeds(b: int, at: int) -> dict[str, np.ndarray]:
        chosen = [bodies[(at + i) % len(bodies)] for i in range(b)]
        rows = [np.asarray([engine.row_of[i] for i in body["history"]], dtype=np.int64) for body in chosen]
        return engine.feeds([body["query"] for body in chosen], rows)

    rows = []
    rates: dict[tuple[int, bool, int], dict[str, Any]] = {}
    for b in batch_sizes:
        batches = [batch_feeds(b, j * b) for j in range(4)]  # distinct requests, cycled
        tokens = sequence_tokens(batches[0])
        flops = statistics.median(counted_flops(tower.tower, f) for f in batches)
        measured = {t: _timed(_cycled(s.encode_query, batches)) for t, s in sessions.items()}
        eager = _timed(_cycled(tower.encode_query, batches))
        int8_ms = _timed(_cycled(int8_sessions.encode_query, batches)) * 1000 if int8_sessions else None
        m = b * tokens
        for int8 in (False, True):
            for t in threads:
                if (m, int8, t) not in rates:
                    rates[(m, int8, t)] = gemm_rate(shapes, m, int8, t)
        fp32 = {t: flops / (rates[(m, False, t)]["gflop_s"] * 1e9) for t in threads}
        int8_floor = flops / (rates[(m, True, threads[0])]["gflop_s"] * 1e9)
        # The int8 bundle's own floor: its fp32-kept MatMuls at the fp32 rate, the rest at the int8 rate.
        mixed = None if int8_fp32 is None else int8_fp32 * fp32[threads[0]] + (1 - int8_fp32) * int8_floor
        row = {
            "batch": b,
            "tokens_per_request": tokens,
            "flops_per_batch": flops,
            "gemm_gflop_s": {str(t): rates[(m, False, t)]["gflop_s"] for t in threads},
            "gemm_int8_gop_s": {str(t): rates[(m, True, t)]["gflop_s"] for t in threads},
            "floor_ms": {str(t): fp32[t] * 1000 for t in threads},
            "floor_int8_ms": int8_floor * 1000,
            "ort_ms": {str(t): measured[t] * 1000 for t in threads},
            "ort_over_floor": {str(t): measured[t] / fp32[t] for t in threads},
            "ort_gflop_s": {str(t): flops / measured[t] / 1e9 for t in threads},
            "torch_eager_ms": eager * 1000,
            "torch_over_floor": eager / fp32[threads[0]],
            "int8_ort_ms": int8_ms,
            "int8_bundle_floor_ms": None if mixed is None else mixed * 1000,
            "int8_over_floor": None if int8_ms is None or mixed is None else int8_ms / (mixed * 1000),
        }
        rows.append(row)
        log.info(
            "floor: batch %d (%d tokens/request): %.2f GFLOP, floor %.2f ms, ORT %s, eager %.2f ms",
            b, tokens, flops / 1e9, fp32[threads[0]] * 1000,
            ", ".join(f"{t} thread(s) {measured[t] * 1000:.2f} ms ({measured[t] / fp32[t]:.2f}x)" for t in threads),
            eager * 1000,
        )  # fmt: skip
    return {
        "rows": rows,
        "threads": list(threads),
        "weight_matmuls": sum(shapes.values()),
        "weight_shapes": [{"k": k, "n": n, "count": c} for (k, n), c in sorted(shapes.items())],
        "gemm": list(rates.values()),
        "int8_bundle": None if int8_bundle is None else str(int8_bundle),
        "int8_bundle_fp32_share": int8_fp32,
        "method": (
            "floor = FLOPs of the batch (FlopCounterMode on the served PyTorch tower, the service's own feeds) / "
            "ORT MatMul rate at the graph's weight shapes (one-node graphs, M = batch x tokens); measured = the "
            "bundle's query session, median over >= 1 s of repeated distinct batches"
        ),
    }
