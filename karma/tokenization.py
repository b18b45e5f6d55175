"""The tokenizer contract shared by training, export and the service (torch-free).

Training, the ONNX parity tests and the service must turn a query into exactly the same ids, so
all of them go through `TextTokenizer`, which wraps a `tokenizers.Tokenizer` loaded from the
`tokenizer.json` that travels with every checkpoint and bundle. No special tokens are added: the
model's sequence layout (query tokens, history tokens, [EMB]) is built by the model, not here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_META_FILE = "tokenizer_meta.json"


@dataclass(frozen=True)
class TokenizerMeta:
    """Ids the model relies on; saved beside tokenizer.json."""

    pad_id: int
    eos_id: int


class TextTokenizer:
    """Encode texts to padded id/mask arrays of a fixed maximum length."""

    def __init__(self, tokenizer: Tokenizer, meta: TokenizerMeta):
        self.tokenizer = tokenizer
        self.meta = meta

    @classmethod
    def load(cls, directory: Path) -> TextTokenizer:
        tokenizer = Tokenizer.from_file(str(directory / TOKENIZER_FILE))
        meta = TokenizerMeta(**json.loads((directory / TOKENIZER_META_FILE).read_text()))
        return cls(tokenizer, meta)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(directory / TOKENIZER_FILE))
        (directory / TOKENIZER_META_FILE).write_text(json.dumps(self.meta.__dict__))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def ids(self, texts: list[str], max_tokens: int, full_lengths: list[int] | None = None) -> list[list[int]]:
        """Unpadded ids, truncated to `max_tokens` (no special tokens added).

        `full_lengths`, when given, receives each text's token count before truncation (so a caller
        can tell a client its query was cut, at no extra tokenisation).
        """
        encodings = self.tokenizer.encode_batch([t or "" for t in texts], add_special_tokens=False)
        if full_lengths is not None:
            full_lengths.extend(len(e.ids) for e in encodings)
        return [e.ids[:max_tokens] for e in encodings]

    def encode(
        self, texts: list[str], max_tokens: int, min_length: int = 1, full_lengths: list[int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask) int64 arrays of shape (B, L), right-padded with pad_id; L >= min_length.

        `min_length` keeps the tensor non-empty when every text is empty (ML data has no queries):
        a zero-length axis is legal in torch but a trap in ONNX. `full_lengths`: see `ids`.
        """
        rows = self.ids(texts, max_tokens, full_lengths)
        length = max(min_length, max((len(r) for r in rows), default=0))
        ids = np.full((len(rows), length), self.meta.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), length), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return ids, mask
