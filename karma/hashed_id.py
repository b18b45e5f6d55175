"""Hashed item-ID buckets for the optional ID embedding.

The bucket of an item must be the same in training, export and serving, in every process and on
every machine, so it is blake2b of the id's UTF-8 bytes salted with the seed, never Python's
`hash()` (salted per process). Pure numpy + hashlib: the torch-free service can import it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

_PERSON = b"karma-item-id"


def _salt(seed: int) -> bytes:
    """The seed as blake2b salt (16 bytes); any Python int works, negatives included."""
    return (seed % (1 << 128)).to_bytes(16, "little")


def hashed_id_bucket(item_id: object, num_buckets: int, seed: int = 0) -> int:
    """Bucket in [0, num_buckets) of one item id (its `str()` is hashed)."""
    digest = hashlib.blake2b(
        str(item_id).encode("utf-8", "surrogatepass"), digest_size=8, salt=_salt(seed), person=_PERSON
    ).digest()
    return int.from_bytes(digest, "little") % num_buckets


def hashed_id_buckets(item_ids: Iterable[object], num_buckets: int, seed: int = 0) -> np.ndarray:
    """(N,) int64 buckets in [0, num_buckets), stable across processes, runs and machines."""
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be positive, got {num_buckets}")
    salt = _salt(seed)
    out = [
        int.from_bytes(
            hashlib.blake2b(str(i).encode("utf-8", "surrogatepass"), digest_size=8, salt=salt, person=_PERSON).digest(),
            "little",
        )
        % num_buckets
        for i in item_ids
    ]
    return np.asarray(out, dtype=np.int64).reshape(-1)
