"""Build the served towers from a checkpoint's weights alone and export them to ONNX.

Head-stripping is by construction: `build_served_towers` makes a fresh `QueryTower` (on a bare
decoder, no LM head) and a fresh `ItemTower`, and fills them from the checkpoint's
`query_tower.*` / `item_tower.*` tensors. `TrainOnlyHeads` is never constructed, so nothing of it
can reach a graph; what the checkpoint held besides the towers is listed as *dropped*.

Tied weights: `save_checkpoint` stores a shared tensor once (safetensors keeps one name and
records the others in its metadata). With a tied LM head the token embedding is stored as
`heads.lm_head.weight`; it is read here under its served name `query_tower.decoder.embed_tokens`,
and the LM head (the computation) is still never exported.

Exporter: the TorchScript exporter at opset 17 is the default. On the project's models it gives
the same ONNX Runtime latency as the dynamo exporter at opset 18 (measured: 0.15 vs 0.13 ms at
batch 1, 1.40 vs 1.45 ms at batch 32 for the tiny test model), a smaller file, a 30x faster
export (0.3 s vs 8.5 s) and needs no `onnxscript`. `exporter="dynamo"` (opset 18) is an option.
The dynamo exporter at opset 23 with its default optimiser emits a rotary op that ONNX Runtime
rejects for batch > 1 (DESIGN §8); parity always runs at batch > 1, so such a graph never ships.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from karma.bundle import DroppedTensor, GraphSpec, TensorSpec
from karma.config import KarmaConfig
from karma.contracts import (
    HIST_FEATURES_INPUT,
    HIST_MASK_INPUT,
    ITEM_BUCKETS_INPUT,
    ITEM_INPUT,
    ITEM_OUTPUT,
    QUERY_BUCKETS_INPUT,
    QUERY_IDS_INPUT,
    QUERY_INPUTS,
    QUERY_MASK_INPUT,
    QUERY_OUTPUT,
)
from karma.errors import KarmaError
from training.checkpoint import BACKBONE_CONFIG_FILE, MODEL_FILE
from training.model.towers import ItemTower, QueryTower

log = logging.getLogger(__name__)

SERVED_PREFIXES = ("query_tower.", "item_tower.")
EXPORTERS = {"torchscript": 17, "dynamo": 18}  # exporter -> default opset


@dataclass
class ServedTowers:
    """The two towers that serve, rebuilt from the checkpoint's tensors, and what was left behind."""

    query: QueryTower
    item: ItemTower
    hidden: int
    id_buckets: int  # > 0: both graphs take hashed-ID bucket inputs
    dropped: list[DroppedTensor] = field(default_factory=list)
    checkpoint_parameters: int = 0  # unique tensors' elements in model.safetensors

    @property
    def parameters(self) -> dict[str, int]:
        return {"query_tower": _count(self.query), "item_tower": _count(self.item)}


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _bare_decoder(checkpoint: Path) -> nn.Module:
    """The backbone's transformer without an LM head, random weights (filled in by the caller)."""
    from transformers import AutoConfig, AutoModel

    raw = json.loads((checkpoint / BACKBONE_CONFIG_FILE).read_text())
    hf_config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    return AutoModel.from_config(hf_config)


def build_served_towers(checkpoint: Path, config: KarmaConfig, feature_dim: int) -> ServedTowers:
    """Fresh towers filled from `query_tower.*` / `item_tower.*` tensors; train-only heads never built."""
    checkpoint = Path(checkpoint)
    m = config.model
    with safe_open(str(checkpoint / MODEL_FILE), framework="pt") as fh:  # the ID table's size, if trained with one
        id_key = "item_tower.id_embedding.weight"
        id_buckets = int(fh.get_slice(id_key).get_shape()[0]) if id_key in set(fh.keys()) else 0
    with torch.random.fork_rng():
        torch.manual_seed(0)
        decoder = _bare_decoder(checkpoint)
        hidden = int(decoder.config.hidden_size)
        query = QueryTower(decoder, feature_dim, hidden, m.embed_dim, id_buckets, center_emb=m.center_emb)
        item = ItemTower(feature_dim, m.item_tower_hidden, m.embed_dim, id_buckets)

    with safe_open(str(checkpoint / MODEL_FILE), framework="pt") as fh:
        stored = set(fh.keys())
        aliases = {k: v for k, v in (fh.metadata() or {}).items() if v in stored and k not in stored}
        shapes = {k: fh.get_slice(k).get_shape() for k in stored}

        def tensor(name: str) -> torch.Tensor:
            return fh.get_tensor(name if name in stored else aliases[name])

        for prefix, tower in (("query_tower.", query), ("item_tower.", item)):
            expected = set(tower.state_dict())
            available = {k.removeprefix(prefix) for k in (*stored, *aliases) if k.startswith(prefix)}
            missing, unexpected = sorted(expected - available), sorted(available - expected)
            if missing or unexpected:
                raise KarmaError(
                    f"{checkpoint}: {prefix.rstrip('.')} weights do not fit the served architecture "
                    f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
                )
            tower.load_state_dict({k: tensor(prefix + k) for k in expected}, strict=True)

    groups: dict[str, list[str]] = {k: [k] for k in stored}  # stored tensor -> every name it has
    for alias, kept in aliases.items():
        groups[kept].append(alias)
    dropped: dict[str, DroppedTensor] = {}
    for kept, names in sorted(groups.items()):
        served = sorted(n for n in names if n.startswith(SERVED_PREFIXES))
        for name in sorted(n for n in names if not n.startswith(SERVED_PREFIXES)):
            module = ".".join(name.split(".")[:2])
            entry = dropped.setdefault(module, DroppedTensor(module=module, tensors=[], parameters=0))
            entry.tensors.append(name)
            entry.shared_with.extend(served)
            if not served:
                entry.parameters += int(np.prod(shapes[kept]))
    total = sum(int(np.prod(s)) for s in shapes.values())
    query.eval()
    item.eval()
    return ServedTowers(query, item, hidden, id_buckets, list(dropped.values()), total)


# ---- example inputs ------------------------------------------------------------------------------


def example_query_inputs(
    features: np.ndarray, vocab_size: int, id_buckets: int, batch: int = 2, query_len: int = 3, hist_len: int = 4
) -> dict[str, torch.Tensor]:
    """A small padded batch: padding in both query (right) and history (left), so the traced graph
    keeps the general masked path rather than an all-ones shortcut."""
    rng = np.random.default_rng(0)
    query_ids = torch.from_numpy(rng.integers(0, vocab_size, (batch, query_len)))
    query_mask = torch.ones(batch, query_len, dtype=torch.long)
    query_mask[0, query_len - 1 :] = 0
    hist_mask = torch.ones(batch, hist_len, dtype=torch.long)
    hist_mask[0, : hist_len // 2] = 0
    rows = rng.integers(0, len(features), (batch, hist_len))
    inputs = {
        QUERY_IDS_INPUT: query_ids,
        QUERY_MASK_INPUT: query_mask,
        HIST_FEATURES_INPUT: torch.from_numpy(np.ascontiguousarray(features[rows], dtype=np.float32)),
        HIST_MASK_INPUT: hist_mask,
    }
    if id_buckets:
        inputs[QUERY_BUCKETS_INPUT] = torch.from_numpy(rng.integers(0, id_buckets, (batch, hist_len)))
    return inputs


def example_item_inputs(features: np.ndarray, id_buckets: int, n: int = 3) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    inputs = {ITEM_INPUT: torch.from_numpy(np.ascontiguousarray(features[:n], dtype=np.float32))}
    if id_buckets:
        inputs[ITEM_BUCKETS_INPUT] = torch.from_numpy(rng.integers(0, id_buckets, (n,)))
    return inputs


# ---- export --------------------------------------------------------------------------------------


def _axes(name: str) -> dict[int, str]:
    return {
        QUERY_IDS_INPUT: {0: "batch", 1: "query_tokens"},
        QUERY_MASK_INPUT: {0: "batch", 1: "query_tokens"},
        HIST_FEATURES_INPUT: {0: "batch", 1: "history"},
        HIST_MASK_INPUT: {0: "batch", 1: "history"},
        QUERY_BUCKETS_INPUT: {0: "batch", 1: "history"},
        QUERY_OUTPUT: {0: "batch"},
        ITEM_INPUT: {0: "items"},
        ITEM_BUCKETS_INPUT: {0: "items"},
        ITEM_OUTPUT: {0: "items"},
    }[name]


def _export_one(
    module: nn.Module,
    inputs: dict[str, torch.Tensor],
    output: str,
    path: Path,
    exporter: str,
    opset: int,
) -> None:
    names = list(inputs)
    args = tuple(inputs[n] for n in names)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter; parity is the real check
        if exporter == "torchscript":
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=names,
                output_names=[output],
                dynamic_axes={n: _axes(n) for n in [*names, output]},
                do_constant_folding=True,
            )
        elif exporter == "dynamo":
            try:
                import onnxscript  # noqa: F401
            except ImportError:
                raise KarmaError("--exporter dynamo needs the onnxscript package (pip install onnxscript)") from None
            dims: dict[str, torch.export.Dim] = {}
            shapes = {
                n: {axis: dims.setdefault(label, torch.export.Dim(label)) for axis, label in _axes(n).items()}
                for n in names
            }
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                opset_version=opset,
                input_names=names,
                output_names=[output],
                dynamic_shapes=shapes,
                optimize=True,
                verbose=False,
            )
            program.save(str(path))
        else:
            raise KarmaError(f"unknown exporter {exporter!r}; use one of {sorted(EXPORTERS)}")


def graph_structure(path: Path) -> dict[str, Any]:
    """Node count, op histogram and initializer elements of an ONNX file (the served cost's shape)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops = Counter(node.op_type for node in model.graph.node)
    params = sum(int(np.prod(init.dims)) for init in model.graph.initializer)
    return {"nodes": len(model.graph.node), "op_histogram": dict(sorted(ops.items())), "parameters": params}


def _tensor_specs(inputs: dict[str, torch.Tensor]) -> list[TensorSpec]:
    specs = []
    for name, value in inputs.items():
        axes = _axes(name)
        shape: list[int | str] = [axes.get(i, int(s)) for i, s in enumerate(value.shape)]
        specs.append(TensorSpec(name=name, dtype=str(value.dtype).removeprefix("torch."), shape=shape))
    return specs


def export_encoders(
    towers: ServedTowers,
    out_dir: Path,
    features: np.ndarray,
    vocab_size: int,
    exporter: str = "torchscript",
    opset: int | None = None,
) -> tuple[int, GraphSpec, GraphSpec]:
    """Write query_encoder.onnx and item_encoder.onnx; returns (opset, query spec, item spec)."""
    from karma.bundle import ITEM_ENCODER_FILE, QUERY_ENCODER_FILE

    if exporter not in EXPORTERS:
        raise KarmaError(f"unknown exporter {exporter!r}; use one of {sorted(EXPORTERS)}")
    opset = opset or EXPORTERS[exporter]
    embed_dim = towers.query.out.out_features
    q_inputs = example_query_inputs(features, vocab_size, towers.id_buckets)
    i_inputs = example_item_inputs(features, towers.id_buckets)
    specs = []
    for module, inputs, output, file in (
        (towers.query, q_inputs, QUERY_OUTPUT, QUERY_ENCODER_FILE),
        (towers.item, i_inputs, ITEM_OUTPUT, ITEM_ENCODER_FILE),
    ):
        _export_one(module, inputs, output, out_dir / file, exporter, opset)
        batch_axis = _axes(output)[0]
        structure = graph_structure(out_dir / file)
        specs.append(
            GraphSpec(
                file=file,
                inputs=_tensor_specs(inputs),
                outputs=[TensorSpec(name=output, dtype="float32", shape=[batch_axis, embed_dim])],
                torch_parameters=_count(module),
                **structure,
            )
        )
    assert [s.name for s in specs[0].inputs][:4] == list(QUERY_INPUTS)
    return opset, specs[0], specs[1]
