"""The export bundle: its manifest schema and the validating loader (torch-free; the service imports it).

    <bundle>/
        manifest.json           this schema (written last: a folder with a manifest is a complete bundle)
        query_encoder.onnx      (query_ids, query_mask, hist_features, hist_mask[, hist_buckets]) -> h (B, D)
        item_encoder.onnx       (features[, id_buckets]) -> e (N, D)
                                (both fp32 by default; ORT-optimised and/or int8 when manifest onnx.variant says so)
        tokenizer.json, tokenizer_meta.json
        items.parquet           item_id + the catalog's text fields; row i = FAISS id i
        item_features.npy       (N, F) float32 content features in the manifest's feature layout
        item_id_buckets.npy     (N,) int64, only when the layout has hashed-ID buckets
        item_embeddings.npy     (N, D) float32, from item_encoder.onnx
        index.faiss             FAISS index over item_embeddings (row ids)

`load_bundle` checks everything before it returns (schema version, every file present with its
sha256, the content hash, array shapes against the dims, the ONNX graphs' inputs and outputs
against the manifest) and raises one `KarmaError` naming the first problem, so a caller never
holds a half-loaded bundle. ONNX Runtime sessions for serving are opened separately
(`Bundle.open_sessions`), with the caller's providers and thread counts.
"""

from __future__ import annotations

import hashlib
import json
import mmap as mmap_module
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from karma.contracts import (
    ITEM_BUCKETS_INPUT,
    ITEM_INPUT,
    ITEM_OUTPUT,
    QUERY_BUCKETS_INPUT,
    QUERY_OUTPUT,
    FeatureLayout,
)
from karma.errors import KarmaError
from karma.tokenization import TOKENIZER_FILE, TOKENIZER_META_FILE, TextTokenizer

SCHEMA_VERSION = 2  # 2: model_version signs the whole manifest, not only the files

MANIFEST_FILE = "manifest.json"
QUERY_ENCODER_FILE = "query_encoder.onnx"
ITEM_ENCODER_FILE = "item_encoder.onnx"
ITEMS_FILE = "items.parquet"
ITEM_FEATURES_FILE = "item_features.npy"
ITEM_ID_BUCKETS_FILE = "item_id_buckets.npy"
ITEM_EMBEDDINGS_FILE = "item_embeddings.npy"
INDEX_FILE = "index.faiss"


_ORT_DTYPES = {"tensor(int64)": "int64", "tensor(float)": "float32"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileEntry(_Strict):
    sha256: str
    bytes: int


class Dims(_Strict):
    feature_dim: int = Field(description="F: width of one item's content feature vector.")
    embed_dim: int = Field(description="D: width of h_t and of the item embeddings.")
    hidden: int = Field(description="Hidden size of the LLM backbone (one continuous token).")


class TensorSpec(_Strict):
    name: str
    dtype: str  # int64 | float32
    shape: list[int | str]  # str = a dynamic axis


class GraphSpec(_Strict):
    file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    nodes: int = Field(description="Node count of the exported graph.")
    op_histogram: dict[str, int] = Field(description="ONNX op type -> count.")
    parameters: int = Field(description="Elements in the graph's initializers (its weights).")
    torch_parameters: int = Field(description="Parameters of the PyTorch tower it was exported from.")


class OnnxVariant(_Strict):
    """Which optional ONNX Runtime transformations the shipped encoders went through (export.optimize).

    The default (neither) is the plain fp32 export, bit-for-bit what the exporter wrote.
    """

    optimized: bool = Field(False, description="Offline ORT graph optimisation (fusions) baked into the files.")
    quantized: Literal["int8"] | None = Field(None, description="int8: dynamic quantisation of MatMul/Gemm weights.")
    optimization_level: str | None = Field(None, description="ORT level used offline, e.g. extended.")
    quantization: dict[str, Any] | None = Field(None, description="quantize_dynamic settings and what it quantised.")
    onnxruntime_version: str | None = Field(None, description="ORT that wrote the variant (its contrib ops).")

    @property
    def name(self) -> str:
        """fp32 | optimized | int8 | optimized+int8."""
        parts = (["optimized"] if self.optimized else []) + ([self.quantized] if self.quantized else [])
        return "+".join(parts) or "fp32"


class OnnxInfo(_Strict):
    exporter: str  # torchscript | dynamo
    opset: int
    torch_version: str
    query_encoder: GraphSpec
    item_encoder: GraphSpec
    variant: OnnxVariant = Field(default_factory=OnnxVariant)


class IndexInfo(_Strict):
    type: Literal["flat", "hnsw", "ivfpq"]
    faiss_class: str
    metric: Literal["inner_product"]
    params: dict[str, Any]
    n_items: int
    file: str = INDEX_FILE


class TokenizerInfo(_Strict):
    files: list[str]
    pad_id: int
    eos_id: int
    vocab_size: int


class DroppedTensor(_Strict):
    module: str = Field(description="Train-only module, e.g. heads.recon_prefix.")
    tensors: list[str]
    parameters: int
    shared_with: list[str] = Field(
        default_factory=list,
        description="Served tensors that are the same storage (tied weights): shipped as those, never as the head.",
    )


class TrainingInfo(_Strict):
    preset: str | None
    backbone: str
    step: int | None
    checkpoint: str
    config: dict[str, Any]
    metrics: dict[str, Any] | None = None


class TextEncoderInfo(_Strict):
    """What computes the text block of a new item's features (`POST /items`), shipped with the bundle."""

    block: str = Field(description="The feature block it fills, e.g. text:minilm-l6-v2.")
    kind: Literal["hashing", "onnx"] = Field(description="hashing: karma.text_features; onnx: text_encoder.onnx.")
    dim: int = Field(description="Width of the block.")
    version: str = Field(description="The training encoder's version string (package, truncation, pooling).")
    max_tokens: int | None = Field(None, description="Tokens a text is truncated to (onnx).")
    files: list[str] = Field(default_factory=list, description="Bundle files it needs.")
    parity: dict[str, Any] | None = Field(None, description="Export's check against training's text block.")


class Manifest(_Strict):
    schema_version: int
    model_version: str = Field(
        description="sha256 of the rest of this manifest (which lists every file's sha256), 16 hex: manifest_version."
    )
    created_at: str
    dims: Dims
    max_query_tokens: int
    max_history: int
    tokenizer: TokenizerInfo
    feature_layout: dict[str, Any]
    item_text_fields: list[str]
    n_items: int
    item_embeddings_source: str
    files: dict[str, FileEntry]
    index: IndexInfo
    onnx: OnnxInfo
    training: TrainingInfo
    dropped: list[DroppedTensor]
    served_parameters: dict[str, int]
    parity: dict[str, Any] | None = None
    cost: dict[str, Any] | None = Field(
        None, description="FLOPs of one reference request (export.cost): query_flops, item_flops_per_item."
    )
    text_encoder: TextEncoderInfo | None = Field(
        None, description="The item text encoder shipped for live item upserts; None: the catalog is fixed."
    )

    @property
    def layout(self) -> FeatureLayout:
        return FeatureLayout.from_dict(self.feature_layout)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def manifest_version(manifest: dict[str, Any]) -> str:
    """The model version: sha256 of the whole manifest but its `model_version` (canonical JSON), 16 hex.

    The manifest lists every file's sha256, so this covers every byte served *and* every setting the
    manifest itself carries (max_history, dims, index parameters, ...): an edited manifest is a new
    version or, if not re-signed, a refused bundle — never the old version with new behaviour.
    """
    body = {key: value for key, value in manifest.items() if key != "model_version"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_manifest(directory: Path, manifest: Manifest | dict[str, Any]) -> str:
    """Sign (`model_version` = `manifest_version`) and write manifest.json; returns the version."""
    raw = manifest.model_dump(mode="json") if isinstance(manifest, Manifest) else dict(manifest)
    raw = json.loads(json.dumps(raw))  # exactly what a reader will parse back
    raw["model_version"] = manifest_version(raw)
    (Path(directory) / MANIFEST_FILE).write_text(json.dumps(raw, indent=2), encoding="utf-8")
    return str(raw["model_version"])


def file_entries(directory: Path, names: list[str]) -> dict[str, FileEntry]:
    return {n: FileEntry(sha256=sha256_file(directory / n), bytes=(directory / n).stat().st_size) for n in names}


# ---- loading -------------------------------------------------------------------------------------


@dataclass
class EncoderSessions:
    """ONNX Runtime sessions for the two served graphs, checked against the manifest."""

    query: Any  # onnxruntime.InferenceSession
    item: Any
    manifest: Manifest

    @property
    def providers(self) -> list[str]:
        return list(self.query.get_providers())

    def encode_query(self, feeds: dict[str, np.ndarray], run_options: Any = None) -> np.ndarray:
        """h_t for a batch of feeds; `run_options` (an ort.RunOptions) lets another thread terminate the run."""
        return self.query.run([QUERY_OUTPUT], feeds, run_options)[0]

    def encode_items(self, features: np.ndarray, id_buckets: np.ndarray | None = None) -> np.ndarray:
        feeds = {ITEM_INPUT: np.ascontiguousarray(features, dtype=np.float32)}
        if any(i.name == ITEM_BUCKETS_INPUT for i in self.manifest.onnx.item_encoder.inputs):
            if id_buckets is None:
                raise KarmaError("this bundle's item encoder needs id_buckets beside the features")
            feeds[ITEM_BUCKETS_INPUT] = np.asarray(id_buckets, dtype=np.int64)
        return self.item.run([ITEM_OUTPUT], feeds)[0]


@dataclass
class Bundle:
    """A validated bundle: manifest, catalog rows, arrays, tokenizer and (optionally) the FAISS index."""

    directory: Path
    manifest: Manifest
    items: Any  # pandas.DataFrame: item_id + text fields, row i = FAISS id i
    item_features: np.ndarray
    item_embeddings: np.ndarray
    item_id_buckets: np.ndarray | None
    tokenizer: TextTokenizer
    index: Any | None  # faiss.Index

    @property
    def model_version(self) -> str:
        return self.manifest.model_version

    @property
    def layout(self) -> FeatureLayout:
        return self.manifest.layout

    def path(self, name: str) -> Path:
        return self.directory / name

    @property
    def query_takes_buckets(self) -> bool:
        """Whether the query encoder reads item-ID rows (a model trained with model.id_embedding)."""
        return QUERY_BUCKETS_INPUT in {i.name for i in self.manifest.onnx.query_encoder.inputs}

    def query_feeds(self, queries: Sequence[str], histories: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """The query encoder's inputs for (query text, item-row history) requests, built as training built them."""
        from karma.featurize import query_encoder_feeds

        m = self.manifest
        buckets = self.item_id_buckets if self.query_takes_buckets else None
        return query_encoder_feeds(
            self.tokenizer, self.item_features, queries, histories, m.max_query_tokens, m.max_history, buckets
        )

    def open_sessions(
        self,
        providers: list[str] | None = None,
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
        optimize: bool = True,
    ) -> EncoderSessions:
        """Serving sessions (CPU unless `providers` says otherwise); their I/O is checked against the manifest."""
        query = open_session(self.path(QUERY_ENCODER_FILE), providers, intra_op_threads, inter_op_threads, optimize)
        item = open_session(self.path(ITEM_ENCODER_FILE), providers, intra_op_threads, inter_op_threads, optimize)
        where = f"bundle {self.directory}"
        check_session_io(query, self.manifest.onnx.query_encoder, where)
        check_session_io(item, self.manifest.onnx.item_encoder, where)
        return EncoderSessions(query=query, item=item, manifest=self.manifest)


def open_session(
    path: Path, providers: list[str] | None = None, intra: int = 1, inter: int = 1, optimize: bool = True
) -> Any:
    """One ONNX Runtime session with explicit thread counts (never ORT's all-cores default, DESIGN §8)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra
    options.inter_op_num_threads = inter
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for unreadable graphs
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise KarmaError(f"{path}: ONNX Runtime cannot load it: {detail}") from None


def open_text_encoder(directory: Path, info: TextEncoderInfo, intra_op_threads: int = 1) -> Any:
    """The shipped item text encoder (`encode(texts) -> (N, dim)`), as the service runs it for new items."""
    from karma.text_features import TEXT_ENCODER_FILE, HashingTextEncoder, OnnxTextEncoder

    if info.kind == "hashing":
        encoder: Any = HashingTextEncoder(info.dim, cached=False)
    else:
        session = open_session(Path(directory) / TEXT_ENCODER_FILE, None, intra_op_threads, 1)
        encoder = OnnxTextEncoder(directory, session, info.block, info.dim, info.max_tokens or 64)
    if encoder.name != info.block:
        raise KarmaError(f"bundle {directory}: text_encoder says block {info.block!r}, the encoder is {encoder.name!r}")
    return encoder


def _spec_of(arg: Any) -> TensorSpec:
    shape = [d if isinstance(d, int) else str(d) for d in arg.shape]
    return TensorSpec(name=arg.name, dtype=_ORT_DTYPES.get(arg.type, arg.type), shape=shape)


def check_session_io(session: Any, spec: GraphSpec, where: str) -> None:
    """The graph's inputs/outputs (names, dtypes, fixed dims, dynamic axes) must be the manifest's."""
    for kind, actual_args, expected in (
        ("input", session.get_inputs(), spec.inputs),
        ("output", session.get_outputs(), spec.outputs),
    ):
        actual = [_spec_of(a) for a in actual_args]
        if [a.name for a in actual] != [e.name for e in expected]:
            raise KarmaError(
                f"{where}: {spec.file} has {kind}s {[a.name for a in actual]}, "
                f"the manifest lists {[e.name for e in expected]}"
            )
        for a, e in zip(actual, expected, strict=True):
            if a.dtype != e.dtype or len(a.shape) != len(e.shape):
                raise KarmaError(
                    f"{where}: {spec.file} {kind} '{a.name}' is {a.dtype} rank {len(a.shape)}, "
                    f"the manifest says {e.dtype} rank {len(e.shape)}"
                )
            for axis, (da, de) in enumerate(zip(a.shape, e.shape, strict=True)):
                if isinstance(da, int) != isinstance(de, int) or (isinstance(de, int) and da != de):
                    in_graph = f"size {da}" if isinstance(da, int) else f"dynamic ({da})"
                    in_manifest = f"size {de}" if isinstance(de, int) else f"dynamic ({de})"
                    raise KarmaError(
                        f"{where}: {spec.file} {kind} '{a.name}' axis {axis} is {in_graph} in the graph, "
                        f"{in_manifest} in the manifest"
                    )


def read_manifest(directory: Path) -> Manifest:
    """Parse and schema-check manifest.json (no file checks)."""
    directory = Path(directory)
    where = f"bundle {directory}"
    path = directory / MANIFEST_FILE
    if not directory.is_dir():
        raise KarmaError(f"{where}: not a folder")
    if not path.is_file():
        raise KarmaError(f"{where}: no {MANIFEST_FILE} (not a bundle, or an export that did not finish)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KarmaError(f"{where}: {MANIFEST_FILE} is not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or "schema_version" not in raw:
        raise KarmaError(f"{where}: {MANIFEST_FILE} has no schema_version")
    if raw["schema_version"] != SCHEMA_VERSION:
        raise KarmaError(
            f"{where}: manifest schema_version is {raw['schema_version']!r}, this KARMA reads version "
            f"{SCHEMA_VERSION}; re-export the checkpoint with this version"
        )
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:3])
        raise KarmaError(f"{where}: {MANIFEST_FILE} does not fit schema version {SCHEMA_VERSION}: {problems}") from None
    try:
        signed = manifest_version(raw)
    except ValueError as exc:  # NaN / infinity in the JSON
        raise KarmaError(f"{where}: {MANIFEST_FILE} holds a value JSON cannot carry ({exc})") from None
    if signed != manifest.model_version:
        raise KarmaError(
            f"{where}: model_version {manifest.model_version} is not the hash of the manifest ({signed}): "
            "the manifest was edited after export"
        )
    return manifest


def _check_files(directory: Path, manifest: Manifest, verify_checksums: bool, where: str) -> None:
    required = {QUERY_ENCODER_FILE, ITEM_ENCODER_FILE, ITEMS_FILE, ITEM_FEATURES_FILE, ITEM_EMBEDDINGS_FILE}
    required |= {manifest.index.file, *manifest.tokenizer.files}
    if manifest.text_encoder is not None:
        required |= set(manifest.text_encoder.files)
    if manifest.layout.id_buckets > 0:
        required.add(ITEM_ID_BUCKETS_FILE)
    unlisted = sorted(required - set(manifest.files))
    if unlisted:
        raise KarmaError(f"{where}: the manifest does not list required file(s) {unlisted}")
    for name, entry in manifest.files.items():
        path = directory / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise KarmaError(f"{where}: manifest file name {name!r} points outside the bundle")
        if not path.is_file():
            raise KarmaError(f"{where}: missing file {name} (listed in the manifest)")
        size = path.stat().st_size
        if size != entry.bytes:
            raise KarmaError(f"{where}: {name} is {size} bytes, the manifest says {entry.bytes} (changed or truncated)")
    if verify_checksums:
        for name, entry in manifest.files.items():
            if sha256_file(directory / name) != entry.sha256:
                raise KarmaError(f"{where}: {name} does not match its sha256 in the manifest (changed or corrupt)")


def _load_npy(path: Path, dtype: str, shape: tuple[int, ...], what: str, where: str, mmap: bool = False) -> np.ndarray:
    """`mmap`: map the file read-only instead of reading it (rows are paged in when a request gathers them)."""
    try:
        array = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
        if mmap and hasattr(array, "_mmap") and hasattr(mmap_module, "MADV_RANDOM"):
            array._mmap.madvise(mmap_module.MADV_RANDOM)  # rows are gathered at random: no read-ahead
    except (ValueError, OSError) as exc:
        raise KarmaError(f"{where}: {path.name} is not a readable .npy file ({exc})") from None
    if array.dtype != np.dtype(dtype) or array.shape != shape:
        raise KarmaError(f"{where}: {path.name} is {array.dtype} {array.shape}, but {what} gives {dtype} {shape}")
    return array


def _bad_rows(array: np.ndarray) -> int:
    return int(np.count_nonzero(~np.isfinite(array.sum(axis=1, dtype=np.float64))))


def _rows_not_finite(path: Path, mapped: np.memmap, chunk_bytes: int = 64 << 20) -> int:
    """`_bad_rows` of a mapped 2-D .npy, read through a buffer: checking the mapping itself would make every
    page of the file resident in this process."""
    rows, width = mapped.shape
    rows_per_chunk = max(1, chunk_bytes // max(1, width * mapped.dtype.itemsize))
    bad = 0
    with path.open("rb") as handle:
        handle.seek(mapped.offset)
        for start in range(0, rows, rows_per_chunk):
            count = min(rows_per_chunk, rows - start)
            chunk = np.fromfile(handle, dtype=mapped.dtype, count=count * width).reshape(count, width)
            bad += _bad_rows(chunk)
    return bad


def import_faiss() -> Any:
    """`import faiss` without its loader's INFO lines about CPU-specific builds it did not find."""
    import logging

    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss

    return faiss


def load_index(directory: Path, info: IndexInfo) -> Any:
    """Read the FAISS index and apply its recorded search-time parameters (nprobe, efSearch)."""
    faiss = import_faiss()

    index = faiss.read_index(str(directory / info.file))
    if "nprobe" in info.params:
        faiss.extract_index_ivf(index).nprobe = int(info.params["nprobe"])
    if "ef_search" in info.params:
        index.hnsw.efSearch = int(info.params["ef_search"])
    return index


def load_bundle(
    directory: Path | str,
    *,
    verify_checksums: bool = True,
    check_graphs: bool = True,
    with_index: bool = True,
) -> Bundle:
    """Validate a bundle completely, then return it; any problem is one `KarmaError` naming it.

    `check_graphs` opens each ONNX graph once, unoptimised, to compare its inputs/outputs with the
    manifest (`Bundle.open_sessions` repeats that check on the serving sessions, so a caller that
    opens sessions right away may pass False). `with_index=False` skips reading the FAISS index
    (its checksum is still verified).
    """
    directory = Path(directory)
    where = f"bundle {directory}"
    manifest = read_manifest(directory)
    _check_files(directory, manifest, verify_checksums, where)

    try:
        layout = manifest.layout
    except (ValueError, KeyError, TypeError) as exc:
        raise KarmaError(f"{where}: feature_layout in the manifest is invalid: {exc}") from None
    dims, n = manifest.dims, manifest.n_items
    if layout.dim != dims.feature_dim:
        raise KarmaError(f"{where}: dims.feature_dim={dims.feature_dim} but the feature layout adds up to {layout.dim}")
    if manifest.index.n_items != n:
        raise KarmaError(f"{where}: index.n_items={manifest.index.n_items} but n_items={n}")
    # Item features are only gathered row by row (a request's history): mapped, not loaded, so a replica's
    # memory is bounded by the index and the embeddings, not by F x catalog.
    features = _load_npy(
        directory / ITEM_FEATURES_FILE, "float32", (n, dims.feature_dim), "n_items x dims.feature_dim", where, True
    )
    embeddings = _load_npy(
        directory / ITEM_EMBEDDINGS_FILE, "float32", (n, dims.embed_dim), "n_items x dims.embed_dim", where
    )
    # Row sums in float64 are non-finite exactly when a row holds NaN/inf (float32 values cannot
    # overflow them), and need n floats of scratch instead of an n x F mask at start-up.
    for name, array in ((ITEM_FEATURES_FILE, features), (ITEM_EMBEDDINGS_FILE, embeddings)):
        bad = _rows_not_finite(directory / name, array) if isinstance(array, np.memmap) else _bad_rows(array)
        if bad:
            raise KarmaError(f"{where}: {name} has {bad} row(s) with NaN or infinite values")
    if n and float(np.einsum("ij,ij->i", embeddings, embeddings).min()) < 1e-12:
        raise KarmaError(f"{where}: {ITEM_EMBEDDINGS_FILE} has all-zero rows (an item no query can reach)")
    buckets = None
    if layout.id_buckets > 0:
        buckets = _load_npy(directory / ITEM_ID_BUCKETS_FILE, "int64", (n,), "n_items", where)
        if n and (buckets.min() < 0 or buckets.max() >= layout.id_buckets):
            raise KarmaError(f"{where}: {ITEM_ID_BUCKETS_FILE} has buckets outside [0, {layout.id_buckets})")

    import pyarrow.parquet as pq

    items = pq.read_table(directory / ITEMS_FILE).to_pandas()
    if len(items) != n or "item_id" not in items.columns:
        raise KarmaError(f"{where}: {ITEMS_FILE} has {len(items)} rows (need {n}) and columns {list(items.columns)}")
    if items["item_id"].duplicated().any():
        raise KarmaError(f"{where}: {ITEMS_FILE} has duplicate item ids")

    tokenizer = TextTokenizer.load(directory)
    if tokenizer.meta.pad_id != manifest.tokenizer.pad_id or tokenizer.vocab_size != manifest.tokenizer.vocab_size:
        raise KarmaError(f"{where}: {TOKENIZER_FILE}/{TOKENIZER_META_FILE} do not match the manifest's tokenizer")

    for graph in (manifest.onnx.query_encoder, manifest.onnx.item_encoder):
        _check_graph_spec(graph, manifest, where)
    if manifest.text_encoder is not None:
        text = manifest.text_encoder
        blocks = {b.name: b.dim for b in layout.blocks}
        if blocks.get(text.block) != text.dim:
            raise KarmaError(
                f"{where}: text_encoder fills block {text.block!r} ({text.dim}-d), the feature layout has {blocks}"
            )
    if check_graphs:
        for graph in (manifest.onnx.query_encoder, manifest.onnx.item_encoder):
            check_session_io(open_session(directory / graph.file, None, 1, 1, optimize=False), graph, where)

    index = None
    if with_index:
        try:
            index = load_index(directory, manifest.index)
        except RuntimeError as exc:
            raise KarmaError(f"{where}: {manifest.index.file}: FAISS cannot read it: {exc}") from None
        if index.ntotal != n or index.d != dims.embed_dim:
            raise KarmaError(
                f"{where}: {manifest.index.file} holds {index.ntotal} vectors of dim {index.d}, "
                f"the manifest says {n} of dims.embed_dim={dims.embed_dim}"
            )
    return Bundle(directory, manifest, items, features, embeddings, buckets, tokenizer, index)


def _check_graph_spec(graph: GraphSpec, manifest: Manifest, where: str) -> None:
    """The manifest's own graph specs must agree with its dims (the session check compares them to the file)."""
    dims = manifest.dims
    expect = {
        "hist_features": dims.feature_dim,
        ITEM_INPUT: dims.feature_dim,
        QUERY_OUTPUT: dims.embed_dim,
        ITEM_OUTPUT: dims.embed_dim,
    }
    for spec in (*graph.inputs, *graph.outputs):
        if spec.name in expect and spec.shape[-1] != expect[spec.name]:
            which = "feature_dim" if spec.name in {"hist_features", ITEM_INPUT} else "embed_dim"
            raise KarmaError(
                f"{where}: {graph.file} '{spec.name}' has last axis {spec.shape[-1]}, dims.{which}={expect[spec.name]}"
            )


def bundle_summary(manifest: Manifest) -> dict[str, Any]:
    """A short, JSON-able description (what `karma export` prints and `/info` may show)."""
    return {
        "model_version": manifest.model_version,
        "dims": manifest.dims.model_dump(),
        "n_items": manifest.n_items,
        "index": {"type": manifest.index.type, **manifest.index.params},
        "exporter": f"{manifest.onnx.exporter} opset {manifest.onnx.opset}",
        "onnx_variant": manifest.onnx.variant.name,
        "served_parameters": manifest.served_parameters,
    }


def resign_bundle(directory: Path | str) -> None:
    """Make a deliberately edited bundle self-consistent again (file sizes, checksums, model_version).

    For fault drills and tests that need a bundle that passes every integrity check but holds a
    hostile value (e.g. `max_history: 4096`): the service must then refuse it on its merits.
    """
    directory = Path(directory)
    manifest = json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))
    entries = file_entries(directory, list(manifest["files"]))
    manifest["files"] = {name: e.model_dump() for name, e in entries.items()}
    write_manifest(directory, manifest)
