"""Item text -> frozen text features without torch: what the service needs to featurise items that arrive live.

Training builds the text block of every item's features with `training.features.text` (MiniLM in
PyTorch, or the weight-free hashing featurizer). A bundle carries what the service needs to do the
same for a new item (`Manifest.text_encoder`):

- kind `hashing`: nothing but this module's `HashingTextEncoder` (the one implementation, which
  training imports too), byte-identical in every process;
- kind `onnx`: `text_encoder.onnx` (MiniLM's transformer with mean pooling and L2 normalisation in the
  graph) and `text_tokenizer.json` (its WordPiece tokenizer, with [CLS]/[SEP] and truncation), run by
  `OnnxTextEncoder` with ONNX Runtime and `tokenizers`; export checks it against the PyTorch encoder.

`join_item_text` is how the catalog's text fields become one string, for training and live items alike.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

TEXT_ENCODER_FILE = "text_encoder.onnx"
TEXT_TOKENIZER_FILE = "text_tokenizer.json"
TEXT_IDS_INPUT = "input_ids"  # (texts, tokens) int64
TEXT_MASK_INPUT = "attention_mask"  # (texts, tokens) int64, 1 = real token
TEXT_OUTPUT = "text_embedding"  # (texts, dim) float32 unit rows


def join_item_text(fields: Sequence[str], values: Sequence[str]) -> str:
    """One item's text as the text encoder sees it: the first field bare, then 'field: value' pairs, ' | '-joined.

    Labels tell the encoder what a value is ('genres: Comedy'); empty values are left out.
    """
    if not fields:
        return ""
    parts = [values[0]] + [f"{name}: {v}" for name, v in zip(fields[1:], values[1:], strict=True) if v]
    return " | ".join(p for p in parts if p)


_WORD = re.compile(r"\w+", re.UNICODE)


def _bucket_of(token: str, dim: int) -> tuple[int, float]:
    """Stable (bucket, sign) of one token."""
    digest = hashlib.blake2b(token.encode("utf-8", "surrogatepass"), digest_size=8, person=b"karma-text").digest()
    value = int.from_bytes(digest, "little")
    return value % dim, (1.0 if (value >> 63) & 1 == 0 else -1.0)


_bucket = lru_cache(maxsize=1 << 20)(_bucket_of)  # catalog vocabularies repeat heavily (training)


class HashingTextEncoder:
    """Signed feature hashing of lowercased word unigrams and character trigrams, L2-normalised.

    Needs no weights and is identical across processes and machines (blake2b, never `hash()`,
    which is salted per process). Texts that share words or word pieces get similar vectors; an
    empty text maps to the zero vector.
    """

    version = "blake2b-signed;words+char3;v1"

    def __init__(self, dim: int = 128, cached: bool = True) -> None:
        """`cached`: memoise token buckets (training's catalogs); the service passes False, so client text
        cannot grow a cache."""
        if dim < 1:
            raise ValueError(f"hashing dim must be positive, got {dim}")
        self.dim = dim
        self.name = f"text:hashing-{dim}"
        self._bucket = _bucket if cached else _bucket_of

    @staticmethod
    def tokens(text: str) -> list[str]:
        """The hashed features of `text`: 'w:<word>' per word and 'c:<tri>' per trigram of ' word '."""
        words = _WORD.findall(text.lower())
        feats = [f"w:{w}" for w in words]
        for w in words:
            padded = f" {w} "
            feats.extend(f"c:{padded[i : i + 3]}" for i in range(len(padded) - 2))
        return feats

    def encode(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32; unit rows except for texts with no word characters (zeros)."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            vec = out[row]
            for token in self.tokens(text):
                bucket, sign = self._bucket(token, self.dim)
                vec[bucket] += sign
            norm = float(np.linalg.norm(vec))
            if norm > 0:
                vec /= norm
        return out


class OnnxTextEncoder:
    """A sentence encoder exported to ONNX (MiniLM): tokenizers + ONNX Runtime, pooling inside the graph.

    Texts are sorted by length and encoded in batches, so short texts do not pay for a long one's padding.
    """

    def __init__(self, directory: Path, session: Any, name: str, dim: int, max_tokens: int, batch_size: int = 64):
        """`session`: an ONNX Runtime session of `text_encoder.onnx` (`karma.bundle.open_text_encoder` opens it)."""
        from tokenizers import Tokenizer

        self.name = name
        self.dim = dim
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self.tokenizer = Tokenizer.from_file(str(Path(directory) / TEXT_TOKENIZER_FILE))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=max_tokens)
        self.session = session

    def encode(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32 unit rows, in input order."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        encodings = self.tokenizer.encode_batch([t or "" for t in texts])
        order = np.argsort([len(e.ids) for e in encodings], kind="stable")
        for start in range(0, len(texts), self.batch_size):
            rows = order[start : start + self.batch_size]
            length = max(len(encodings[i].ids) for i in rows)
            ids = np.zeros((len(rows), length), dtype=np.int64)
            mask = np.zeros((len(rows), length), dtype=np.int64)
            for j, i in enumerate(rows):
                n = len(encodings[i].ids)
                ids[j, :n] = encodings[i].ids
                mask[j, :n] = 1
            out[rows] = self.session.run([TEXT_OUTPUT], {TEXT_IDS_INPUT: ids, TEXT_MASK_INPUT: mask})[0]
        return out


def item_texts(fields: Sequence[str], items: Sequence[Mapping[str, str]]) -> list[str]:
    """`join_item_text` for items given as {field: value} (missing fields are empty)."""
    return [join_item_text(fields, [str(item.get(f) or "") for f in fields]) for item in items]
