"""Ship the item text encoder inside the bundle, so the torch-free service can featurise items that arrive live.

`POST /items` must give a new item exactly the text features training gave the catalog, or its
vector would sit in a different part of the space. For the hashing featurizer nothing needs
shipping (the service runs the same code, `karma.text_features`); for MiniLM the transformer is
exported to ONNX with its mean pooling and L2 normalisation inside the graph, beside its own
tokenizer. Either way `check_text_encoder` re-encodes a sample of catalog items with what the
service will run and compares it with the text block training used: a bundle whose shipped encoder
disagrees is refused like a tower that disagrees.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from karma.bundle import TextEncoderInfo, open_text_encoder
from karma.config import KarmaConfig
from karma.errors import KarmaError
from karma.text_features import (
    TEXT_ENCODER_FILE,
    TEXT_IDS_INPUT,
    TEXT_MASK_INPUT,
    TEXT_OUTPUT,
    TEXT_TOKENIZER_FILE,
)

log = logging.getLogger(__name__)

TEXT_PARITY_ITEMS = 64  # catalog items re-encoded by the shipped encoder at export
TEXT_PARITY_TOLERANCE = 1e-4  # max abs difference vs the training features' text block


def _export_minilm(model_dir: Path, staging: Path, opset: int = 17) -> None:
    import torch
    from transformers import AutoModel

    from training.features.text import mean_pooled_unit

    model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval()

    class Pooled(torch.nn.Module):
        """BERT -> mean over real tokens -> unit length: what `MiniLMTextEncoder.encode` computes."""

        def __init__(self, bert: torch.nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return mean_pooled_unit(self.bert(input_ids=input_ids, attention_mask=attention_mask)[0], attention_mask)

    ids = torch.ones((2, 8), dtype=torch.int64)
    mask = torch.ones((2, 8), dtype=torch.int64)
    axes = {0: "texts", 1: "tokens"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Pooled(model),
            (ids, mask),
            str(staging / TEXT_ENCODER_FILE),
            dynamo=False,
            opset_version=opset,
            input_names=[TEXT_IDS_INPUT, TEXT_MASK_INPUT],
            output_names=[TEXT_OUTPUT],
            dynamic_axes={TEXT_IDS_INPUT: axes, TEXT_MASK_INPUT: axes, TEXT_OUTPUT: {0: "texts"}},
            do_constant_folding=True,
        )
    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise KarmaError(f"{model_dir}: no tokenizer.json beside the MiniLM weights; cannot ship the text encoder")
    shutil.copyfile(tokenizer_file, staging / TEXT_TOKENIZER_FILE)


def write_text_encoder(
    staging: Path, config: KarmaConfig, block: str, dim: int, ship: bool = True
) -> TextEncoderInfo | None:
    """Write what the service needs to compute feature block `block` for a new item; None when `ship` is False
    (the bundle then serves its catalog but `POST /items` answers 409 `items_not_supported`)."""
    fc = config.features
    if not ship:
        return None
    if fc.text_encoder == "hashing":
        from karma.text_features import HashingTextEncoder

        return TextEncoderInfo(block=block, kind="hashing", dim=dim, version=HashingTextEncoder.version)
    if fc.text_encoder == "minilm":
        from training.features.text import MiniLMTextEncoder, minilm_model_dir

        model_dir = minilm_model_dir()
        log.info("export: MiniLM text encoder -> %s", TEXT_ENCODER_FILE)
        _export_minilm(model_dir, staging)
        version = MiniLMTextEncoder(max_tokens=fc.max_text_tokens, progress=False).version
        return TextEncoderInfo(
            block=block,
            kind="onnx",
            dim=dim,
            version=version,
            max_tokens=fc.max_text_tokens,
            files=[TEXT_ENCODER_FILE, TEXT_TOKENIZER_FILE],
        )
    raise KarmaError(f"features.text_encoder={fc.text_encoder!r}: no way to ship it in a bundle")


def check_text_encoder(
    staging: Path,
    info: TextEncoderInfo,
    texts: list[str],
    reference: np.ndarray,
    tolerance: float = TEXT_PARITY_TOLERANCE,
) -> dict[str, Any]:
    """Re-encode `texts` with the shipped encoder; compare with `reference` (training's text block for them)."""
    encoder = open_text_encoder(staging, info)
    got = encoder.encode(texts)
    diff = float(np.abs(got - reference).max()) if len(texts) else 0.0
    norms = np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1)
    cos = np.einsum("ij,ij->i", got, reference) / np.where(norms > 0, norms, 1.0)
    result = {
        "items": len(texts),
        "max_abs_diff": diff,
        "min_cosine": float(cos.min()) if len(texts) else 1.0,
        "tolerance": tolerance,
        "passed": diff <= tolerance,
    }
    if not result["passed"]:
        raise KarmaError(
            f"export: the shipped text encoder ({info.kind}) differs from training's text features by {diff:.2e} "
            f"(> {tolerance:.0e}) on {len(texts)} catalog items; bundle not written (export with --no-text-encoder "
            "to ship the bundle without live item upserts)"
        )
    return result
