"""`export_checkpoint`: checkpoint -> a complete, checksummed, self-describing bundle folder.

Order of work: rebuild the checkpoint's data/features/model (`build_setup`, the reference for
parity); build the served towers from the weights alone; export both ONNX graphs (and, when asked,
replace them by their ORT-optimised and/or int8 variants, `export.optimize`); write the tokenizer,
catalog rows, item features, item embeddings (computed by the exported item encoder, so the index
holds exactly what the service computes for a new item), the FAISS index; run parity (refusing to
publish above tolerance, or below the int8 cosine floor); checksum every file; write manifest.json last;
load the result back through `karma.bundle.load_bundle`. All of this happens in a staging folder
next to the destination that is renamed into place at the end, so the destination is either the
old bundle or the complete new one, never a half-written folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from karma.bundle import (
    INDEX_FILE,
    ITEM_EMBEDDINGS_FILE,
    ITEM_ENCODER_FILE,
    ITEM_FEATURES_FILE,
    ITEM_ID_BUCKETS_FILE,
    ITEMS_FILE,
    MANIFEST_FILE,
    QUERY_ENCODER_FILE,
    SCHEMA_VERSION,
    Dims,
    Manifest,
    OnnxInfo,
    TokenizerInfo,
    TrainingInfo,
    file_entries,
    load_bundle,
    open_session,
    write_manifest,
)
from karma.config import KarmaConfig, load_config
from karma.errors import KarmaError
from karma.tokenization import TOKENIZER_FILE, TOKENIZER_META_FILE
from training.checkpoint import read_checkpoint_info

log = logging.getLogger(__name__)

# Overrides that change where data lives or how fast it is read, never what the model is.
ALLOWED_OVERRIDES = ("paths.", "log_level", "features.threads", "features.text_batch_size", "train.threads")


@dataclass
class ExportResult:
    directory: Path
    manifest: Manifest
    seconds: float

    def file_sizes(self) -> dict[str, int]:
        sizes = {name: entry.bytes for name, entry in self.manifest.files.items()}
        sizes[MANIFEST_FILE] = (self.directory / MANIFEST_FILE).stat().st_size
        return sizes


def export_config(checkpoint: Path, overrides: Sequence[str] = ()) -> KarmaConfig:
    """The checkpoint's own config, with only location/speed overrides allowed."""
    info = read_checkpoint_info(checkpoint)
    for item in overrides:
        key = item.partition("=")[0].strip()
        if not key.startswith(ALLOWED_OVERRIDES):
            raise KarmaError(
                f"export: {key!r} cannot be overridden (the checkpoint fixes the model and data); "
                f"allowed: {', '.join(ALLOWED_OVERRIDES)}"
            )
    return load_config(overrides=list(overrides), environ=allowed_environ(os.environ), base=info.config)


def allowed_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """The KARMA_* variables for the allowed keys (KARMA_PATHS__ARTIFACTS, KARMA_TRAIN__THREADS, …): the env layer
    of the config promise (defaults < file < env < --set) holds for export too, within what it may change."""
    prefixes = tuple("KARMA_" + key.rstrip(".").upper().replace(".", "__") for key in ALLOWED_OVERRIDES)
    return {k: v for k, v in environ.items() if k.startswith(prefixes)}


def _training_metrics(checkpoint: Path) -> dict[str, Any] | None:
    run = checkpoint.parent
    for name in ("metrics.json", "eval_test.json"):
        path = run / name
        if path.is_file():
            data = json.loads(path.read_text())
            return data.get("metrics", data) if isinstance(data, dict) else None
    return None


def _item_embeddings(path: Path, features: np.ndarray, buckets: np.ndarray | None, chunk: int = 4096) -> np.ndarray:
    """Run the exported item encoder over the catalog (what the service does for a new item)."""
    session = open_session(path)
    names = [i.name for i in session.get_inputs()]
    out = []
    for start in range(0, len(features), chunk):
        feeds = {names[0]: np.ascontiguousarray(features[start : start + chunk], dtype=np.float32)}
        if len(names) > 1:
            feeds[names[1]] = np.ascontiguousarray(buckets[start : start + chunk], dtype=np.int64)
        out.append(session.run(None, feeds)[0])
    dim = session.get_outputs()[0].shape[-1]
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, dim), np.float32)


def _write_variant(
    staging: Path, setup: Any, variant: Any, keep: Sequence[str], criterion: dict[str, Any]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Replace the staged fp32 encoders by `variant`; for int8, try each weight range in turn.

    int8 keeps the first weight range whose graphs meet the parity floor on this machine (see
    `export.optimize.quantize_graph` for why neither range is right for every model and CPU); if
    none does, the last one's files stay and the caller's parity check refuses the bundle.
    Returns (file name -> variant details, one record per weight range tried).
    """
    from export.optimize import INT8_WEIGHT_RANGES, variant_files
    from export.parity import check_parity

    names = [QUERY_ENCODER_FILE, ITEM_ENCODER_FILE]
    if not variant.quantized:
        return variant_files(staging, names, variant, keep), []
    fp32 = {name: staging / f"{name}.fp32" for name in names}
    for name in names:
        shutil.copyfile(staging / name, fp32[name])
    attempts: list[dict[str, Any]] = []
    try:
        for weight_range in INT8_WEIGHT_RANGES:
            for name in names:
                shutil.copyfile(fp32[name], staging / name)
            details = variant_files(staging, names, variant, keep, weight_range)
            parity = check_parity(
                staging,
                setup,
                batch_sizes=criterion.get("batch_sizes", (1, 3, 8)),
                min_cosine=criterion.get("min_cosine"),
                random_query_min_cosine=criterion.get("random_query_min_cosine"),
            )
            attempts.append(
                {
                    "weight_range": weight_range,
                    "passed": bool(parity["passed"]),
                    "min_cosine_real": parity["query"]["min_cosine_real"],
                    "min_cosine_random": parity["query"]["min_cosine_random"],
                    "min_cosine_items": parity["item"]["min_cosine"],
                }
            )
            log.info("int8 with %s weights: %s", weight_range, attempts[-1])
            if parity["passed"]:
                break
    finally:
        for path in fp32.values():
            path.unlink(missing_ok=True)
    return details, attempts


def export_checkpoint(
    checkpoint: Path,
    out_dir: Path,
    *,
    index: str = "flat",
    index_params: dict[str, Any] | None = None,
    exporter: str = "torchscript",
    opset: int | None = None,
    overrides: Sequence[str] = (),
    force: bool = False,
    tolerance: float = 1e-4,
    progress: bool = False,
    optimize: bool = False,
    quantize: str | None = None,
    int8_keep_fp32: Sequence[str] | None = None,
    text_encoder: bool = True,
) -> ExportResult:
    """Export `checkpoint` into the bundle folder `out_dir` (see the module docstring).

    `optimize` / `quantize="int8"` replace the fp32 encoders by their ONNX Runtime variants
    (`export.optimize`); parity is then judged by the variant's documented criterion (1e-4 max abs
    diff for `optimize` alone, min cosine >= `export.optimize.INT8_MIN_COSINE` for int8) and a
    variant that fails it is refused like an fp32 graph that fails. `int8_keep_fp32`: MatMul name
    patterns int8 leaves in fp32 (default `export.optimize.INT8_KEEP_FP32`; `()` quantises all).
    `text_encoder`: ship the item text encoder (`export.text_encoder`), so the service can add items live.
    """
    from export.cost import served_cost
    from export.index import build_index, default_params, write_index
    from export.onnx_export import build_served_towers, export_encoders, graph_structure
    from export.optimize import INT8_KEEP_FP32, parity_criterion, variant_of
    from export.parity import check_parity
    from export.text_encoder import TEXT_PARITY_ITEMS, check_text_encoder, write_text_encoder
    from training.setup import build_setup

    started = time.perf_counter()
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    default_params(index, 1, 1)  # unknown index types fail before any work
    variant = variant_of(optimize, quantize)  # unknown --quantize fails before any work
    criterion = parity_criterion(variant, tolerance)
    if int8_keep_fp32 is not None and not variant.quantized:
        raise KarmaError("int8_keep_fp32 (--int8-keep-fp32) only applies with quantize='int8' (--quantize int8)")
    if out_dir.exists() and not force:
        raise KarmaError(f"{out_dir} already exists; pass --force to replace it")
    if out_dir.exists() and not (out_dir / MANIFEST_FILE).is_file() and any(out_dir.iterdir()):
        raise KarmaError(f"{out_dir} is a non-empty folder but not a bundle (no {MANIFEST_FILE}); not replacing it")
    info = read_checkpoint_info(checkpoint)
    config = export_config(checkpoint, overrides)
    setup = build_setup(config, checkpoint=checkpoint, device=torch.device("cpu"), progress=progress)
    towers = build_served_towers(checkpoint, config, setup.features.layout.dim)
    catalog, features = setup.dataset.catalog, setup.features

    staging = out_dir.with_name(f"{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        opset, q_spec, i_spec = export_encoders(
            towers, staging, features.matrix, setup.backbone.tokenizer.vocab_size, exporter, opset
        )
        attempts: list[dict[str, Any]] = []
        if variant.optimized or variant.quantized:
            keep = INT8_KEEP_FP32 if int8_keep_fp32 is None else tuple(int8_keep_fp32)
            details, attempts = _write_variant(staging, setup, variant, keep, criterion)
            q_detail, i_detail = details[QUERY_ENCODER_FILE], details[ITEM_ENCODER_FILE]
            quantization = None
            if variant.quantized:
                quantization = {
                    "query_encoder": q_detail.quantization,
                    "item_encoder": i_detail.quantization,
                    "weight_range_attempts": attempts,
                }
            variant = q_detail.model_copy(update={"quantization": quantization})
            q_spec = q_spec.model_copy(update=graph_structure(staging / QUERY_ENCODER_FILE))
            i_spec = i_spec.model_copy(update=graph_structure(staging / ITEM_ENCODER_FILE))
        setup.backbone.tokenizer.save(staging)
        text_block = features.layout.blocks[0]  # the text block comes first (training.features.build)
        text_info = write_text_encoder(staging, config, text_block.name, text_block.dim, ship=text_encoder)
        if text_info is not None:
            n = min(TEXT_PARITY_ITEMS, catalog.n_items)
            reference = features.block(text_block.name)[:n]
            text_parity = check_text_encoder(staging, text_info, catalog.item_text()[:n], reference)
            text_info = text_info.model_copy(update={"parity": text_parity})
        items = catalog.items[["item_id", *catalog.text_fields]].copy()
        items["item_id"] = items["item_id"].astype(str)
        items.to_parquet(staging / ITEMS_FILE, index=False)
        np.save(staging / ITEM_FEATURES_FILE, np.ascontiguousarray(features.matrix, dtype=np.float32))
        if features.id_buckets is not None:
            np.save(staging / ITEM_ID_BUCKETS_FILE, features.id_buckets.astype(np.int64))
        embeddings = _item_embeddings(staging / ITEM_ENCODER_FILE, features.matrix, features.id_buckets)
        np.save(staging / ITEM_EMBEDDINGS_FILE, embeddings)
        faiss_index, index_info = build_index(embeddings, index, index_params)
        write_index(faiss_index, staging / INDEX_FILE)

        parity = check_parity(
            staging,
            setup,
            batch_sizes=criterion.get("batch_sizes", (1, 3, 8)),
            tolerance=tolerance,
            min_cosine=criterion.get("min_cosine"),
            random_query_min_cosine=criterion.get("random_query_min_cosine"),
        )
        parity["variant"] = variant.name
        if not parity["passed"] and "min_cosine" in criterion:
            tried = "; ".join(
                f"{a['weight_range']} weights: real queries {a['min_cosine_real']:.4f}, items "
                f"{a['min_cosine_items']:.4f}, random queries {a['min_cosine_random']:.4f}"
                for a in attempts
            )
            raise KarmaError(
                f"export of {checkpoint}: the {variant.name} encoders' outputs fall below their cosine floor vs "
                f"PyTorch (need >= {criterion['min_cosine']}, random queries >= "
                f"{criterion['random_query_min_cosine']}) with every int8 weight range ({tried}); "
                "bundle not written (export without --quantize)"
            )
        if not parity["passed"]:
            worst = max(parity["query"]["max_abs_diff"], parity["item"]["max_abs_diff"])
            raise KarmaError(
                f"export of {checkpoint}: ONNX Runtime ({variant.name}) differs from PyTorch by {worst:.2e} "
                f"(> {tolerance:.0e}); bundle not written"
            )

        names = sorted(p.name for p in staging.iterdir() if p.is_file() and p.name != MANIFEST_FILE)
        files = file_entries(staging, names)
        tok = setup.backbone.tokenizer
        manifest = Manifest(
            schema_version=SCHEMA_VERSION,
            model_version="",  # signed by write_manifest
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            dims=Dims(feature_dim=features.layout.dim, embed_dim=config.model.embed_dim, hidden=towers.hidden),
            max_query_tokens=config.model.max_query_tokens,
            max_history=config.data.max_history,
            tokenizer=TokenizerInfo(
                files=[TOKENIZER_FILE, TOKENIZER_META_FILE],
                pad_id=tok.meta.pad_id,
                eos_id=tok.meta.eos_id,
                vocab_size=tok.vocab_size,
            ),
            feature_layout=features.layout.to_dict(),
            item_text_fields=list(catalog.text_fields),
            n_items=catalog.n_items,
            item_embeddings_source=f"{ITEM_ENCODER_FILE} (ONNX Runtime, CPU, {variant.name})",
            files=files,
            index=index_info,
            onnx=OnnxInfo(
                exporter=exporter,
                opset=opset,
                torch_version=torch.__version__,
                query_encoder=q_spec,
                item_encoder=i_spec,
                variant=variant,
            ),
            training=TrainingInfo(
                preset=info.state.get("preset", config.loss.preset),
                backbone=config.model.backbone,
                step=info.state.get("step"),
                checkpoint=str(checkpoint.resolve()),
                config=config.model_dump(mode="json"),
                metrics=_training_metrics(checkpoint),
            ),
            dropped=towers.dropped,
            served_parameters={**towers.parameters, "checkpoint_total": towers.checkpoint_parameters},
            parity=parity,
            cost=served_cost(
                towers, features.matrix, tok.vocab_size, config.model.max_query_tokens, config.data.max_history
            ),
            text_encoder=text_info,
        )
        write_manifest(staging, manifest)
        manifest = load_bundle(staging).manifest  # never publish a bundle the loader would refuse
        old = out_dir.with_name(f"{out_dir.name}.old{os.getpid()}")
        if out_dir.exists():
            out_dir.rename(old)
        staging.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(out_dir, manifest, time.perf_counter() - started)
