"""Optional ONNX Runtime variants at export: int8 dynamic quantisation and offline graph optimisation.

One tiny checkpoint is trained once per module and exported three times (fp32, int8, optimized);
the tests read those bundles back through `load_bundle` and real ONNX Runtime sessions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

import export.optimize as optimize
from export.bundle_writer import export_checkpoint
from export.optimize import gemm_to_matmul, matmuls_matching
from karma.bundle import ITEM_ENCODER_FILE, QUERY_ENCODER_FILE, load_bundle, open_session
from karma.config import load_config
from karma.errors import KarmaError
from recipes.cli import app
from tests.helpers import tiny_train_overrides
from training.checkpoint import read_checkpoint_info
from training.setup import build_setup
from training.trainer import CHECKPOINT_DIR, run_dir, train


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("variants")
    config = load_config(overrides=[*tiny_train_overrides(root), "train.run_name=variants"], environ={})
    train(config, progress=False, evaluate_at_end=False)
    checkpoint = run_dir(config) / CHECKPOINT_DIR
    out = {"checkpoint": checkpoint}
    for name, kwargs in (("fp32", {}), ("int8", {"quantize": "int8"}), ("optimized", {"optimize": True})):
        out[name] = export_checkpoint(checkpoint, root / f"bundle-{name}", **kwargs).directory
    out["setup"] = build_setup(
        read_checkpoint_info(checkpoint).config, checkpoint=checkpoint, device=torch.device("cpu"), progress=False
    )
    return out


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _test_users(setup) -> dict[str, torch.Tensor]:
    return setup.batcher.encoder_inputs(np.sort(setup.split.test_pos[:64]))


# ---- int8 -------------------------------------------------------------------------------------------------


def test_int8_bundle_loads_and_its_manifest_says_int8(bundles: dict) -> None:
    bundle = load_bundle(bundles["int8"])
    variant = bundle.manifest.onnx.variant
    assert (variant.optimized, variant.quantized, variant.name) == (False, "int8", "int8")
    q = variant.quantization["query_encoder"]
    assert q["quantized_matmuls"] > 0 and q["kept_fp32_patterns"] == ["mlp/down_proj"]
    assert q["kept_fp32_matmuls"] == 2  # one MLP down-projection per decoder layer (tiny: 2 layers)
    assert variant.quantization["item_encoder"]["gemm_rewritten_to_matmul"] == 3  # nn.Linear on 2-D -> Gemm
    # The weight range shipped is the first tried that met the floor; every try is on record.
    attempts = variant.quantization["weight_range_attempts"]
    assert [a["weight_range"] for a in attempts] == list(optimize.INT8_WEIGHT_RANGES[: len(attempts)])
    assert attempts[-1]["passed"] and not any(a["passed"] for a in attempts[:-1])
    assert q["weight_range"] == attempts[-1]["weight_range"]
    parity = bundle.manifest.parity
    assert parity["passed"] and parity["criterion"] == {
        "metric": "min_cosine",
        "min_cosine": 0.99,
        "random_query_min_cosine": 0.95,
    }
    assert min(parity["query"]["min_cosine_real"], parity["item"]["min_cosine"]) >= 0.99
    assert 32 in parity["batch_sizes"] and parity["variant"] == "int8"
    assert "int8" in bundle.manifest.item_embeddings_source
    # The default fp32 export records the plain variant and the old 1e-4 criterion.
    fp32 = load_bundle(bundles["fp32"], check_graphs=False).manifest
    assert fp32.onnx.variant.name == "fp32" and fp32.parity["criterion"]["tolerance"] == 1e-4


def test_int8_graphs_hold_int8_weights_and_are_smaller(bundles: dict) -> None:
    for file in (QUERY_ENCODER_FILE, ITEM_ENCODER_FILE):
        graph = onnx.load(str(bundles["int8"] / file)).graph
        inits = {i.name: i for i in graph.initializer}
        integer = [n for n in graph.node if n.op_type == "MatMulInteger"]
        assert integer, file
        for node in integer:  # every quantised MatMul multiplies by an int8 weight initializer
            assert inits[node.input[1]].data_type == onnx.TensorProto.INT8, (file, node.name)
        assert not [n for n in graph.node if n.op_type == "Gemm"], file
        fp32_size = (bundles["fp32"] / file).stat().st_size
        assert (bundles["int8"] / file).stat().st_size < fp32_size, file
    # Inputs and outputs are the fp32 graph's: the service feeds an int8 bundle the same way.
    q8 = open_session(bundles["int8"] / QUERY_ENCODER_FILE)
    q32 = open_session(bundles["fp32"] / QUERY_ENCODER_FILE)
    assert [(i.name, i.type) for i in q8.get_inputs()] == [(i.name, i.type) for i in q32.get_inputs()]


def test_int8_h_and_item_vectors_have_cosine_at_least_0_99_with_pytorch(bundles: dict) -> None:
    setup = bundles["setup"]
    inputs = _test_users(setup)
    bundle = load_bundle(bundles["int8"])
    sessions = bundle.open_sessions()
    with torch.inference_mode():
        reference_h = setup.model.eval().query_tower(**inputs).numpy()
        buckets = None if bundle.item_id_buckets is None else torch.from_numpy(bundle.item_id_buckets)
        reference_e = setup.model.item_tower(torch.from_numpy(np.array(bundle.item_features)), buckets).numpy()
    h = sessions.encode_query({k: v.numpy() for k, v in inputs.items()})
    assert _cosine(h, reference_h).min() >= 0.99
    assert not np.allclose(h, reference_h, atol=1e-5)  # it really is a different (quantised) function
    e = sessions.encode_items(bundle.item_features, bundle.item_id_buckets)
    assert _cosine(e, reference_e).min() >= 0.99
    np.testing.assert_allclose(bundle.item_embeddings, e, atol=1e-6)  # the index holds the int8 tower's vectors


def test_a_variant_below_its_parity_floor_is_refused(bundles: dict, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(optimize, "INT8_MIN_COSINE", 0.9999999)
    with pytest.raises(KarmaError, match=r"int8 encoders' outputs fall below .*7-bit weights.*8-bit weights.*not wr"):
        export_checkpoint(bundles["checkpoint"], tmp_path / "refused", quantize="int8")
    assert not (tmp_path / "refused").exists()
    assert not list(tmp_path.iterdir())  # no staging folder left behind


# ---- graph optimisation -------------------------------------------------------------------------------------


def test_optimized_variant_gives_the_fp32_h_within_1e_4(bundles: dict) -> None:
    setup = bundles["setup"]
    feeds = {k: v.numpy() for k, v in _test_users(setup).items()}
    optimized, fp32 = load_bundle(bundles["optimized"]), load_bundle(bundles["fp32"])
    variant = optimized.manifest.onnx.variant
    assert (variant.optimized, variant.quantized, variant.optimization_level) == (True, None, "extended")
    assert optimized.manifest.parity["passed"] and optimized.manifest.parity["criterion"]["tolerance"] == 1e-4
    h_opt = optimized.open_sessions().encode_query(feeds)
    h_fp32 = fp32.open_sessions().encode_query(feeds)
    np.testing.assert_allclose(h_opt, h_fp32, atol=1e-4, rtol=0)
    np.testing.assert_allclose(optimized.item_embeddings, fp32.item_embeddings, atol=1e-4, rtol=0)
    # The file holds ORT's fusions (contrib ops), so it is smaller in nodes than the exporter's graph.
    graph = onnx.load(str(bundles["optimized"] / QUERY_ENCODER_FILE)).graph
    assert len(graph.node) < fp32.manifest.onnx.query_encoder.nodes
    assert {n.domain for n in graph.node} & {"com.microsoft"}
    assert optimized.manifest.onnx.query_encoder.nodes == len(graph.node)


# ---- the command line ----------------------------------------------------------------------------------------


def test_cli_exports_optimized_int8_and_rejects_bad_flags(bundles: dict, tmp_path: Path) -> None:
    out = tmp_path / "both"
    args = ["export", str(bundles["checkpoint"]), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--optimize", "--quantize", "int8"])
    assert result.exit_code == 0, result.output
    assert "encoders: optimized+int8" in result.output and "required: min cosine >= 0.99" in result.output
    assert load_bundle(out).manifest.onnx.variant.name == "optimized+int8"
    # KarmaError reaches `recipes.cli.main`, which prints "error: ..." and exits 2.
    bad = CliRunner().invoke(app, [*args, "--quantize", "int4", "--force"])
    assert isinstance(bad.exception, KarmaError) and "unknown --quantize 'int4'" in str(bad.exception)
    stray = CliRunner().invoke(app, [*args, "--int8-keep-fp32", "none", "--force"])
    assert isinstance(stray.exception, KarmaError) and "only applies with" in str(stray.exception)
    assert load_bundle(out).manifest.onnx.variant.name == "optimized+int8"  # neither touched the bundle


# ---- graph rewrites (no training needed) -------------------------------------------------------------------


def _gemm_model(trans_b: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 4) if trans_b else (4, 5)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    helper = onnx.helper
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="lin", transB=trans_b)],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 5])],
        [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(b, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_to_matmul_is_exact(trans_b: int, tmp_path: Path) -> None:
    model = _gemm_model(trans_b)
    onnx.save(model, str(tmp_path / "gemm.onnx"))
    assert gemm_to_matmul(model) == 1
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Add"]
    assert [i.name for i in model.graph.initializer] == ["b", "w__matmul"]  # the unused original is dropped
    onnx.checker.check_model(model)
    onnx.save(model, str(tmp_path / "matmul.onnx"))
    x = np.random.default_rng(1).standard_normal((7, 4)).astype(np.float32)
    before = open_session(tmp_path / "gemm.onnx").run(None, {"x": x})[0]
    after = open_session(tmp_path / "matmul.onnx").run(None, {"x": x})[0]
    np.testing.assert_allclose(after, before, atol=1e-6)


def test_keep_fp32_patterns_match_node_or_weight_names() -> None:
    helper = onnx.helper
    nodes = [
        helper.make_node("MatMul", ["a", "onnx::MatMul_9"], ["b"], name="/decoder/layers.0/mlp/down_proj/MatMul"),
        helper.make_node("MatMul", ["b", "decoder.layers.0.mlp.down_proj.weight"], ["c"], name="node_MatMul_3"),
        helper.make_node("MatMul", ["c", "decoder.layers.0.mlp.up_proj.weight"], ["d"], name="node_MatMul_4"),
    ]
    model = helper.make_model(helper.make_graph(nodes, "g", [], []))
    assert matmuls_matching(model, ["mlp/down_proj"]) == ["/decoder/layers.0/mlp/down_proj/MatMul", "node_MatMul_3"]
    assert matmuls_matching(model, []) == []
