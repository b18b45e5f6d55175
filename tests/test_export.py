"""Export: ONNX parity, head-stripping by construction, bundle validation, new items, the FAISS index.

Two real tiny checkpoints (action-only and karma, same architecture) are trained once per module
and exported once; every test reads those bundles through real ONNX Runtime sessions and FAISS.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from export.bundle_writer import export_checkpoint
from export.index import build_index, exact_top_k
from export.onnx_export import build_served_towers
from export.parity import check_parity
from karma.bundle import (
    ITEM_EMBEDDINGS_FILE,
    ITEM_ENCODER_FILE,
    MANIFEST_FILE,
    QUERY_ENCODER_FILE,
    SCHEMA_VERSION,
    load_bundle,
    write_manifest,
)
from karma.config import load_config
from karma.errors import KarmaError
from recipes.cli import app
from tests.helpers import tiny_train_overrides
from training.checkpoint import read_checkpoint_info
from training.setup import build_setup, embed_items
from training.trainer import CHECKPOINT_DIR, run_dir, train

PRESETS = ("action-only", "karma")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Per preset: checkpoint, bundle folder and the restored training setup (the PyTorch reference)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("export")
    out = {}
    for preset in PRESETS:
        config = load_config(
            overrides=[*tiny_train_overrides(root), f"loss.preset={preset}", f"train.run_name={preset}"], environ={}
        )
        train(config, progress=False)
        checkpoint = run_dir(config) / CHECKPOINT_DIR
        bundle = root / f"bundle-{preset}"
        if preset == "karma":
            export_checkpoint(checkpoint, bundle)
        else:  # the other one through the command line, with an HNSW index
            result = CliRunner().invoke(
                app, ["export", str(checkpoint), "--out", str(bundle), "--index", "hnsw", "--index-param", "m=16"]
            )
            assert result.exit_code == 0, result.output
            assert "parity vs PyTorch" in result.output and "query_encoder.onnx" in result.output
        setup = build_setup(
            read_checkpoint_info(checkpoint).config, checkpoint=checkpoint, device=torch.device("cpu"), progress=False
        )
        out[preset] = {"checkpoint": checkpoint, "bundle": bundle, "setup": setup}
    return out


# ---- parity ----------------------------------------------------------------------------------------


def test_export_parity_is_recorded_for_every_batch_size_and_length(exported: dict) -> None:
    manifest = load_bundle(exported["karma"]["bundle"]).manifest
    parity = manifest.parity
    assert parity["passed"] and parity["tolerance"] == 1e-4
    query_cases = {(c["inputs"], c["batch"], c["history"]) for c in parity["cases"] if c["encoder"] == "query"}
    assert query_cases == {(k, b, h) for k in ("real", "random") for b in (1, 3, 8) for h in (1, 7, 20)}
    for side in ("query", "item"):
        assert parity[side]["max_abs_diff"] < 1e-4
        assert parity[side]["min_cosine"] > 0.99999


def test_parity_from_a_checkpoint_at_other_shapes(exported: dict) -> None:
    report = check_parity(exported["karma"]["bundle"], exported["karma"]["checkpoint"], (2, 5), (3, 13), seed=7)
    assert report["passed"]
    assert report["query"]["max_abs_diff"] < 1e-4 and report["item"]["max_abs_diff"] < 1e-4
    assert report["query"]["cases"] == 8


# ---- head-stripping ---------------------------------------------------------------------------------


def _graph(path: Path):
    import onnx

    return onnx.load(str(path))


def test_served_graphs_hold_exactly_the_tower_parameters(exported: dict) -> None:
    for preset in PRESETS:
        manifest = load_bundle(exported[preset]["bundle"], check_graphs=False).manifest
        setup = exported[preset]["setup"]
        towers = {
            QUERY_ENCODER_FILE: sum(p.numel() for p in setup.model.query_tower.parameters()),
            ITEM_ENCODER_FILE: sum(p.numel() for p in setup.model.item_tower.parameters()),
        }
        for file, expected in towers.items():
            graph = _graph(exported[preset]["bundle"] / file).graph
            params = sum(int(np.prod(init.dims)) for init in graph.initializer)
            assert params == expected, (preset, file)
            assert not [i.name for i in graph.initializer if "head" in i.name or "recon" in i.name], (preset, file)
        assert manifest.onnx.query_encoder.parameters == towers[QUERY_ENCODER_FILE]
        assert manifest.onnx.item_encoder.parameters == towers[ITEM_ENCODER_FILE]
        # Everything in the checkpoint is either served or listed as dropped.
        served = manifest.served_parameters
        dropped = {d.module: d for d in manifest.dropped}
        assert (
            served["query_tower"] + served["item_tower"] + sum(d.parameters for d in dropped.values())
            == (served["checkpoint_total"])
        )
        assert dropped["heads.recon_prefix"].parameters > 0
        assert dropped["heads.lm_head"].shared_with == ["query_tower.decoder.embed_tokens.weight"]  # tied
        assert ("heads.visual" in dropped) == (preset == "karma")  # the flow head exists only for karma


def test_action_only_and_karma_serve_identical_graphs(exported: dict) -> None:
    manifests = {p: load_bundle(exported[p]["bundle"], check_graphs=False).manifest for p in PRESETS}
    for file in (QUERY_ENCODER_FILE, ITEM_ENCODER_FILE):
        a, b = (_graph(exported[p]["bundle"] / file).graph for p in PRESETS)
        assert [n.op_type for n in a.node] == [n.op_type for n in b.node], file
        assert [(i.name, list(i.dims)) for i in a.initializer] == [(i.name, list(i.dims)) for i in b.initializer]
        assert [i.raw_data for i in a.initializer] != [i.raw_data for i in b.initializer]  # only weights differ
    qa, qb = (manifests[p].onnx.query_encoder for p in PRESETS)
    assert (qa.op_histogram, qa.nodes, qa.parameters) == (qb.op_histogram, qb.nodes, qb.parameters)


def test_served_towers_are_built_without_heads(exported: dict) -> None:
    checkpoint = exported["karma"]["checkpoint"]
    config = read_checkpoint_info(checkpoint).config
    towers = build_served_towers(checkpoint, config, exported["karma"]["setup"].features.layout.dim)
    names = [n for n, _ in towers.query.named_parameters()] + [n for n, _ in towers.item.named_parameters()]
    assert names and not [n for n in names if n.startswith("heads") or "lm_head" in n]
    assert not hasattr(towers.query.decoder, "lm_head")
    assert {d.module for d in towers.dropped} == {"heads.lm_head", "heads.recon_prefix", "heads.visual"}


# ---- bundle validation ------------------------------------------------------------------------------


def _edit_manifest(bundle: Path, edit, sign: bool = True) -> None:
    """Edit manifest.json; re-signed (a self-consistent manifest that later checks must catch) unless sign=False."""
    data = json.loads((bundle / MANIFEST_FILE).read_text())
    edit(data)
    if sign:
        write_manifest(bundle, data)
    else:
        (bundle / MANIFEST_FILE).write_text(json.dumps(data))


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


TAMPERS = {
    "edited onnx byte": (
        lambda b: _flip_byte(b / ITEM_ENCODER_FILE),
        "item_encoder.onnx does not match its sha256 in the manifest",
    ),
    "deleted file": (lambda b: (b / ITEM_EMBEDDINGS_FILE).unlink(), "missing file item_embeddings.npy"),
    "other schema version": (
        lambda b: _edit_manifest(b, lambda m: m.update(schema_version=SCHEMA_VERSION + 1)),
        f"manifest schema_version is {SCHEMA_VERSION + 1}, this KARMA reads version {SCHEMA_VERSION}",
    ),
    "wrong embed_dim": (
        lambda b: _edit_manifest(b, lambda m: m["dims"].update(embed_dim=m["dims"]["embed_dim"] + 1)),
        "n_items x dims.embed_dim",
    ),
    "no manifest": (lambda b: (b / MANIFEST_FILE).unlink(), "no manifest.json"),
    "edited, not re-signed": (
        lambda b: _edit_manifest(b, lambda m: m.update(max_history=4096), sign=False),
        "the manifest was edited after export",
    ),
}


@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_tampered_bundle_is_refused_with_a_clear_message(tamper: str, exported: dict, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(exported["karma"]["bundle"], bundle)
    load_bundle(bundle)  # the intact copy loads
    edit, message = TAMPERS[tamper]
    edit(bundle)
    with pytest.raises(KarmaError) as err:
        load_bundle(bundle)
    text = str(err.value)
    assert message in text and "\n" not in text, text
    assert str(bundle) in text


def test_graph_inputs_are_checked_against_the_manifest(exported: dict, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(exported["karma"]["bundle"], bundle)
    _edit_manifest(bundle, lambda m: m["onnx"]["query_encoder"]["inputs"][2]["shape"].__setitem__(1, 20))
    with pytest.raises(
        KarmaError, match=r"input 'hist_features' axis 1 is dynamic \(history\) in the graph, size 20 in the manifest"
    ):
        load_bundle(bundle)


def test_existing_bundle_is_not_replaced_without_force(exported: dict) -> None:
    before = (exported["karma"]["bundle"] / MANIFEST_FILE).read_bytes()
    with pytest.raises(KarmaError, match="already exists; pass --force"):
        export_checkpoint(exported["karma"]["checkpoint"], exported["karma"]["bundle"])
    assert (exported["karma"]["bundle"] / MANIFEST_FILE).read_bytes() == before


# ---- new items and the index -------------------------------------------------------------------------


def test_new_items_through_item_encoder_onnx_match_the_pytorch_item_tower(exported: dict) -> None:
    bundle = load_bundle(exported["karma"]["bundle"])
    sessions = bundle.open_sessions()
    setup = exported["karma"]["setup"]
    rng = np.random.default_rng(3)
    matrix = bundle.item_features
    new = (rng.standard_normal((37, matrix.shape[1])) * matrix.std(0) + matrix.mean(0)).astype(np.float32)
    # A new item has no trained ID: the exact scheme's 'no ID' row 0, so it is scored from content alone.
    buckets = np.zeros(len(new), dtype=np.int64) if bundle.item_id_buckets is not None else None
    with torch.inference_mode():
        tower = setup.model.eval().item_tower
        reference = tower(torch.from_numpy(new), None if buckets is None else torch.from_numpy(buckets)).numpy()
    np.testing.assert_allclose(sessions.encode_items(new, buckets), reference, atol=1e-5, rtol=0)
    # The shipped catalog embeddings are the same function of the shipped features.
    np.testing.assert_allclose(bundle.item_embeddings, embed_items(setup).numpy(), atol=1e-5, rtol=0)
    assert np.allclose(np.linalg.norm(bundle.item_embeddings, axis=1), 1.0, atol=1e-5)


def test_flat_index_returns_the_exact_top_10(exported: dict) -> None:
    bundle = load_bundle(exported["karma"]["bundle"])
    assert bundle.manifest.index.type == "flat" and bundle.index.ntotal == bundle.manifest.n_items
    embeddings = np.load(exported["karma"]["bundle"] / ITEM_EMBEDDINGS_FILE)
    setup = exported["karma"]["setup"]
    inputs = setup.batcher.encoder_inputs(setup.split.test_pos[:16])
    users = bundle.open_sessions().encode_query({k: v.numpy() for k, v in inputs.items()})
    scores, ids = bundle.index.search(users, 10)
    ref_scores, ref_ids = exact_top_k(embeddings, users, 10)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


def test_hnsw_and_ivfpq_indexes_record_their_parameters(exported: dict) -> None:
    bundle = load_bundle(exported["action-only"]["bundle"])
    info = bundle.manifest.index
    assert info.type == "hnsw" and info.faiss_class == "IndexHNSWFlat"
    assert info.params == {"m": 16, "ef_construction": 200, "ef_search": 128}
    assert bundle.index.hnsw.efSearch == 128
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((20, bundle.manifest.dims.embed_dim)).astype(np.float32)
    _, ref = exact_top_k(bundle.item_embeddings, queries, 10)
    _, got = bundle.index.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, ref, strict=True)])
    assert recall >= 0.9
    index, ivf = build_index(bundle.item_embeddings, "ivfpq")
    assert ivf.params["nlist"] * 39 <= len(bundle.item_embeddings) and index.nprobe == ivf.params["nprobe"]
    with pytest.raises(KarmaError, match="unknown parameter"):
        build_index(bundle.item_embeddings, "hnsw", {"nprobe": 4})


def test_dynamo_exporter_at_opset_18_also_passes_parity(exported: dict, tmp_path: Path) -> None:
    result = export_checkpoint(exported["karma"]["checkpoint"], tmp_path / "dynamo", exporter="dynamo")
    manifest = result.manifest
    assert (manifest.onnx.exporter, manifest.onnx.opset) == ("dynamo", 18)
    assert manifest.parity["passed"] and manifest.parity["query"]["max_abs_diff"] < 1e-4
    assert load_bundle(result.directory).manifest.model_version == manifest.model_version


def test_force_never_replaces_a_folder_that_is_not_a_bundle(exported: dict, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(KarmaError, match="not a bundle"):
        export_checkpoint(exported["karma"]["checkpoint"], tmp_path, force=True)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_bundle_module_does_not_import_torch() -> None:
    code = "import sys, karma.bundle; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---- zero added serving cost -------------------------------------------------------------------------


def test_compare_reports_identical_served_cost_for_action_only_and_karma(exported: dict, tmp_path: Path) -> None:
    out = tmp_path / "compare.json"
    a, b = exported["action-only"]["bundle"], exported["karma"]["bundle"]
    result = CliRunner().invoke(app, ["compare", str(a), str(b), "--requests", "20", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "zero added serving cost" in result.output
    report = json.loads(out.read_text())
    assert report["identical_served_graphs"] and report["differences"] == []
    cost_a, cost_b = report["cost"]["a"], report["cost"]["b"]
    assert cost_a["query_flops"] == cost_b["query_flops"] > 0
    assert cost_a["item_flops_per_item"] == cost_b["item_flops_per_item"] > 0
    # karma trained more train-only parameters (the flow head) and all of them were dropped
    assert report["dropped_train_only_parameters"]["b"] > report["dropped_train_only_parameters"]["a"]
    assert report["latency"]["requests"] == 20 and report["latency"]["p50_ratio_b_over_a"] > 0


def test_compare_fails_when_the_served_architecture_differs(exported: dict, tmp_path: Path) -> None:
    config = load_config(
        overrides=[*tiny_train_overrides(tmp_path), "model.embed_dim=16", "train.run_name=narrow"], environ={}
    )
    train(config, progress=False, evaluate_at_end=False)
    narrow = tmp_path / "bundle-narrow"
    export_checkpoint(run_dir(config) / CHECKPOINT_DIR, narrow)
    result = CliRunner().invoke(app, ["compare", str(exported["karma"]["bundle"]), str(narrow), "--requests", "5"])
    assert result.exit_code == 1
    assert "served graphs DIFFER" in result.output and "initializers differ" in result.output


def test_hashed_id_model_exports_compares_and_serves_with_its_buckets(tmp_path: Path) -> None:
    """A model trained with hashed item-ID embeddings: its query graph takes hist_buckets, and every
    consumer of a bundle (parity, `karma compare`, the service engine) feeds them."""
    from export.compare import compare_bundles
    from service.engine import Engine

    torch.set_num_threads(1)
    config = load_config(
        overrides=[
            *tiny_train_overrides(tmp_path),
            "features.item_ids=hashed",
            "features.hashed_id_buckets=64",
            "train.run_name=ids",
        ],
        environ={},
    )
    train(config, progress=False, evaluate_at_end=False)
    bundle_dir = tmp_path / "bundle-ids"
    result = export_checkpoint(run_dir(config) / CHECKPOINT_DIR, bundle_dir)
    assert result.manifest.parity["passed"]
    bundle = load_bundle(bundle_dir)
    assert bundle.query_takes_buckets and bundle.item_id_buckets is not None
    feeds = bundle.query_feeds(["red dress"], [np.array([3, 1, 4])])
    np.testing.assert_array_equal(feeds["hist_buckets"][0, -3:], bundle.item_id_buckets[[3, 1, 4]])
    report = compare_bundles(bundle_dir, bundle_dir, requests=10)
    assert report["identical_served_graphs"] and report["latency"]["requests"] == 10
    engine = Engine.load(bundle_dir, ["CPUExecutionProvider"], intra_op_threads=1)
    h = engine.sessions.encode_query(engine.feeds(["red dress"], [np.array([3, 1, 4])]))
    np.testing.assert_allclose(h, bundle.open_sessions().encode_query(feeds), atol=1e-6)


def test_search_top_k_reranks_approximate_candidates_exactly() -> None:
    """IVF-PQ's own order vs re-scored with the exact vectors: the re-ranked top-k is the exact top-k
    of its candidates, and recall against the flat index goes up."""
    from karma.search import search_top_k

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:40] + 0.1 * rng.standard_normal((40, 16)).astype(np.float32)
    _, exact_rows = exact_top_k(x, q, 20)
    ivfpq, _ = build_index(x, "ivfpq", {"nlist": 16, "m": 4, "nbits": 4, "nprobe": 16})
    _, approx_rows = search_top_k(ivfpq, x, q, 20, rerank_factor=1)
    scores, rows = search_top_k(ivfpq, x, q, 20, rerank_factor=5)
    np.testing.assert_allclose(scores, np.einsum("bkd,bd->bk", x[rows], q), rtol=1e-5, atol=1e-6)
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first

    def recall(found: np.ndarray) -> float:
        return float(np.mean([len(np.intersect1d(f, e)) / 20 for f, e in zip(found, exact_rows, strict=True)]))

    # Coarse PQ codes (4 x 4 bits) misorder most neighbours; more candidates, re-scored, recover them.
    wide = search_top_k(ivfpq, x, q, 20, rerank_factor=20)[1]
    assert 2 * recall(approx_rows) < recall(rows) < recall(wide) and recall(wide) > 0.95
    flat, _ = build_index(x, "flat", {})
    np.testing.assert_array_equal(search_top_k(flat, x, q, 20)[1], exact_rows)


def test_engine_reranks_an_approximate_index_and_never_a_flat_one(exported: dict) -> None:
    """serve.rerank_factor: the HNSW bundle's results carry exact scores h·e; the flat bundle is left alone."""
    from service.engine import Engine, Job

    hnsw = Engine.load(exported["action-only"]["bundle"], ["CPUExecutionProvider"], 1, rerank_factor=4)
    flat = Engine.load(exported["karma"]["bundle"], ["CPUExecutionProvider"], 1, rerank_factor=4)
    assert (hnsw.manifest.index.type, hnsw.rerank_factor) == ("hnsw", 4)
    assert (flat.manifest.index.type, flat.rerank_factor) == ("flat", 1)
    history, none = np.array([5, 9, 11]), np.zeros(0, dtype=np.int64)
    [result] = hnsw.run_batch([Job("blue shirt", history, 10, none)])
    h = hnsw.sessions.encode_query(hnsw.feeds(["blue shirt"], [history]))[0]
    embeddings = hnsw.bundle.item_embeddings
    np.testing.assert_allclose(result.scores, embeddings[result.rows] @ h, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(result.rows, exact_top_k(embeddings, h[None], 10)[1][0])


def test_centred_emb_state_is_learned_in_training_and_served_as_a_constant(tmp_path: Path) -> None:
    """model.center_emb: the running mean of hidden[EMB] moves during training, is saved with the query
    tower, survives export (parity) and is subtracted at serving time exactly as in PyTorch."""
    torch.set_num_threads(1)
    config = load_config(
        overrides=[*tiny_train_overrides(tmp_path), "model.center_emb=true", "train.run_name=centred"], environ={}
    )
    train(config, progress=False, evaluate_at_end=False)
    checkpoint = run_dir(config) / CHECKPOINT_DIR
    setup = build_setup(read_checkpoint_info(checkpoint).config, checkpoint=checkpoint, progress=False)
    tower = setup.model.query_tower
    steps = config.train.steps
    assert tower.center_emb and int(tower.emb_center_batches) == steps  # one update per action batch
    assert float(tower.emb_center.norm()) > 0
    # The centre is part of h_t: the same hidden state gives another h_t without it.
    hidden = torch.randn(3, tower.emb_center.shape[0])
    tower.eval()
    centred = tower.head(hidden)
    tower.center_emb = False
    assert not torch.allclose(centred, tower.head(hidden))
    tower.center_emb = True
    assert int(tower.emb_center_batches) == steps  # eval never updates it
    result = export_checkpoint(checkpoint, tmp_path / "bundle-centred")
    assert result.manifest.parity["passed"]
    served = build_served_towers(checkpoint, setup.config, setup.features.layout.dim)
    torch.testing.assert_close(served.query.emb_center, tower.emb_center)
