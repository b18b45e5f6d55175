"""On-disk cache of frozen feature matrices, keyed by what they were computed from.

Encoding a large catalog with MiniLM or EfficientNet takes minutes; the result depends only on
the encoder (name + version) and the inputs, in order. The key is a sha256 over exactly those,
so a changed title, a reordered catalog or a new encoder version is a miss, never a stale hit.
Writes are atomic (temporary file + rename), so a crash or a concurrent run never leaves a
half-written array that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from training.features.text import TextEncoder, encode_all

logger = logging.getLogger(__name__)

CACHE_FORMAT = "karma-feature-cache/v1"


def content_key(name: str, version: str, inputs: Sequence[str]) -> str:
    """sha256 hex over the encoder name, its version and every input, in order.

    Each part is length-prefixed, so ('ab', 'c') and ('a', 'bc') get different keys.
    """
    h = hashlib.sha256()

    def part(text: str) -> None:
        data = text.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)

    part(CACHE_FORMAT)
    part(name)
    part(version)
    h.update(len(inputs).to_bytes(8, "little"))
    for text in inputs:
        part(text)
    return h.hexdigest()


def _atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write via a temporary file in the same folder, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """`np.save` that never leaves a partial file at `path`."""
    _atomic_write(path, lambda handle: np.save(handle, array, allow_pickle=False))


def save_text_atomic(path: Path, text: str) -> None:
    """Write UTF-8 text so that readers see the old file or the new one, never a mix."""
    _atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


class FeatureCache:
    """A folder of `<encoder>-<sha256>.npy` arrays (+ a small `.json` note saying what each is)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def path_for(self, name: str, key: str) -> Path:
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "features"
        return self.directory / f"{stem}-{key}.npy"

    def get_or_compute(
        self,
        name: str,
        version: str,
        inputs: Sequence[str],
        compute: Callable[[], np.ndarray],
    ) -> np.ndarray:
        """The cached array for (name, version, inputs), or `compute()` stored under that key."""
        key = content_key(name, version, inputs)
        path = self.path_for(name, key)
        if path.is_file():
            try:
                cached = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as exc:
                logger.warning("feature cache: %s is unreadable (%s); recomputing", path, exc)
            else:
                if cached.ndim >= 1 and cached.shape[0] == len(inputs):
                    logger.info("feature cache hit: %s, %s rows from %s", name, len(inputs), path)
                    return cached
                logger.warning(
                    "feature cache: %s has shape %s, expected %s rows; recomputing", path, cached.shape, len(inputs)
                )
        logger.info("feature cache miss: %s, computing %s rows", name, len(inputs))
        started = time.perf_counter()
        array = compute()
        seconds = time.perf_counter() - started
        if array.shape[0] != len(inputs):
            raise RuntimeError(f"{name}: computed {array.shape[0]} rows for {len(inputs)} inputs")
        save_npy_atomic(path, array)
        note = {
            "name": name,
            "version": version,
            "rows": len(inputs),
            "shape": list(array.shape),
            "dtype": str(array.dtype),
            "key": key,
            "compute_seconds": round(seconds, 3),
        }
        save_text_atomic(path.with_suffix(".json"), json.dumps(note, indent=2))
        logger.info("feature cache: stored %s %s in %.1fs at %s", name, array.shape, seconds, path)
        return array

    def encode_texts(self, encoder: TextEncoder, texts: Sequence[str]) -> np.ndarray:
        """`encoder.encode(texts)`, cached under the encoder's name and version."""
        texts = list(texts)
        return self.get_or_compute(encoder.name, encoder.version, texts, lambda: encode_all(encoder, texts))


def cached_encode(encoder: TextEncoder, texts: Sequence[str], cache_dir: Path) -> np.ndarray:
    """Shortcut for `FeatureCache(cache_dir).encode_texts(encoder, texts)`."""
    return FeatureCache(cache_dir).encode_texts(encoder, texts)
