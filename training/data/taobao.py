"""The public Taobao `UserBehavior.csv` format: user, item, category, behavior, timestamp.

The file has no header and no item text; an item's only content is its category id, which
becomes its text ("category 4690421"). Only the behaviours named in
`data.taobao_click_behaviors` (default `pv`, a page view, i.e. a click) count as events.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from karma.errors import DataValidationError
from training.data.schema import Catalog, Dataset
from training.data.validate import build_interactions, data_line, parse_timestamps, read_delimited, require_non_empty

log = logging.getLogger(__name__)

COLUMNS = ("user_id", "item_id", "category_id", "behavior", "timestamp")
BEHAVIORS = frozenset({"pv", "buy", "cart", "fav"})


def load_taobao_userbehavior(path: Path, click_behaviors: Sequence[str] = ("pv",)) -> Dataset:
    source = str(path)
    unknown_config = set(click_behaviors) - BEHAVIORS
    if unknown_config:
        raise DataValidationError(
            source, f"data.taobao_click_behaviors has {sorted(unknown_config)}; allowed: {sorted(BEHAVIORS)}"
        )
    frame = read_delimited(Path(path), sep=",", header=False, names=COLUMNS)
    if frame.shape[1] != len(COLUMNS) or (frame[list(COLUMNS)] == "").all(axis=1).any():
        raise DataValidationError(source, f"expected {len(COLUMNS)} columns: {', '.join(COLUMNS)}")
    for column in ("user_id", "item_id", "category_id", "behavior", "timestamp"):
        require_non_empty(frame, column, source, header=False)
    bad = np.flatnonzero(~frame["behavior"].isin(BEHAVIORS).to_numpy())
    if len(bad):
        row = int(bad[0])
        raise DataValidationError(
            source,
            f"unknown behavior {frame['behavior'].iloc[row]!r} (allowed: {sorted(BEHAVIORS)})",
            column="behavior",
            line=data_line(row, header=False),
        )
    # Validate timestamps on the whole file so a bad one is reported with its real line number.
    seconds = parse_timestamps(frame["timestamp"], source, "timestamp", header=False)
    is_click = frame["behavior"].isin(list(click_behaviors)).to_numpy()
    clicks = frame[is_click].reset_index(drop=True)
    if clicks.empty:
        raise DataValidationError(source, f"no events with behavior in {list(click_behaviors)}")
    first = clicks.drop_duplicates("item_id", keep="first")
    items = pd.DataFrame(
        {"item_id": first["item_id"].to_numpy(), "category": ("category " + first["category_id"]).to_numpy()}
    )
    catalog = Catalog(items=items, text_fields=("category",))
    interactions = build_interactions(clicks, catalog, source, header=False, timestamps=seconds[is_click])
    log.info("loaded %s: %d click events of %d rows", source, len(clicks), len(frame))
    return Dataset(
        name="taobao-userbehavior",
        catalog=catalog,
        interactions=interactions,
        meta={"source": {"csv": source}, "click_behaviors": list(click_behaviors)},
    )
