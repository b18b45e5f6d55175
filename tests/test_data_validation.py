"""Each data-contract violation gives one error naming the file, the column and the line."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from karma.errors import DataValidationError
from tests.helpers import KARMA_BIN, write
from training.data.recbole import load_recbole
from training.data.taobao import load_taobao_userbehavior

ITEM_HEADER = "item_id:token\tmovie_title:token_seq\tclass:token_seq\n"
INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"


def recbole_dir(tmp_path: Path, inter: str, item: str | None = None, name: str = "toy") -> Path:
    folder = tmp_path / name
    write(folder / f"{name}.inter", inter)
    if item is not None:
        write(folder / f"{name}.item", item)
    return folder


GOOD_ITEMS = ITEM_HEADER + "1\tToy Story\tAnimation\n2\tHeat\tAction\n3\tFargo\tCrime\n"
GOOD_INTER = INTER_HEADER + "u1\t1\t5\t100\nu1\t2\t4\t100\nu1\t3\t3\t90\nu2\t3\t1\t50\n"


def test_good_files_load(tmp_path: Path) -> None:
    ds = load_recbole(recbole_dir(tmp_path, GOOD_INTER, GOOD_ITEMS))
    assert ds.catalog.n_items == 3
    assert ds.catalog.text_fields == ("title", "genres")
    assert ds.catalog.item_text()[0] == "Toy Story | genres: Animation"
    assert ds.interactions.n_events == 4
    assert list(ds.interactions.user_ids) == ["u1", "u2"]
    assert ds.interactions.item_idx.tolist() == [0, 1, 2, 2]
    assert ds.interactions.timestamp.tolist() == [100, 100, 90, 50]


@pytest.mark.parametrize(
    ("inter", "items", "pattern"),
    [
        (
            INTER_HEADER.replace("user_id", "uid") + "u1\t1\t5\t1\n",
            GOOD_ITEMS,
            r"toy\.inter, line 1: missing required column\(s\) \['user_id'\]",
        ),
        (
            GOOD_INTER,
            GOOD_ITEMS + "2\tHeat again\tAction\n",
            r"toy\.item, column 'item_id', line 5: duplicate id '2' \(first on line 3",
        ),
        (
            GOOD_INTER + "u3\t99\t1\t1\n",
            GOOD_ITEMS,
            r"toy\.inter, column 'item_id', line 6: item '99' is not in the catalog",
        ),
        (GOOD_INTER + "\t1\t1\t1\n", GOOD_ITEMS, r"toy\.inter, column 'user_id', line 6: empty value"),
        (
            INTER_HEADER + "u1\t1\t5\t100\nu1\t2\t4\tyesterday\n",
            GOOD_ITEMS,
            r"toy\.inter, column 'timestamp', line 3: unparsable timestamp 'yesterday'",
        ),
        (
            INTER_HEADER + "u1\t1\t5\t100\nu1\t2\t4\t100\textra\n",
            GOOD_ITEMS,
            r"toy\.inter: malformed TSV: Expected 4 fields in line 3, saw 5",
        ),
        ("", GOOD_ITEMS, r"toy\.inter: file is empty"),
        (INTER_HEADER, GOOD_ITEMS, r"toy\.inter: file has a header but no rows"),
        (
            GOOD_INTER,
            GOOD_ITEMS.replace("item_id:token", "id:token"),
            r"toy\.item, line 1: missing required column\(s\) \['item_id'\]",
        ),
    ],
    ids=[
        "missing-column",
        "duplicate-item",
        "unknown-item",
        "empty-user",
        "bad-timestamp",
        "malformed-tsv",
        "empty-file",
        "header-only",
        "item-file-missing-id",
    ],
)
def test_violations_name_file_column_line(tmp_path: Path, inter: str, items: str, pattern: str) -> None:
    with pytest.raises(DataValidationError, match=pattern):
        load_recbole(recbole_dir(tmp_path, inter, items))


def test_iso_timestamps_are_accepted(tmp_path: Path) -> None:
    inter = INTER_HEADER + "u1\t1\t5\t2024-01-02T03:04:05Z\nu1\t2\t5\t1704164645\n"
    ds = load_recbole(recbole_dir(tmp_path, inter, GOOD_ITEMS))
    assert ds.interactions.timestamp.tolist() == [1704164645, 1704164645]


def test_missing_timestamp_column_keeps_file_order(tmp_path: Path) -> None:
    inter = "user_id:token\titem_id:token\nu1\t3\nu1\t1\n"
    ds = load_recbole(recbole_dir(tmp_path, inter, GOOD_ITEMS))
    assert np.all(ds.interactions.timestamp == 0)


TAOBAO = "1,10,100,pv,1511544070\n1,11,100,pv,1511544080\n1,12,101,buy,1511544090\n2,10,100,pv,1511544000\n"


def test_taobao_userbehavior(tmp_path: Path) -> None:
    ds = load_taobao_userbehavior(write(tmp_path / "UserBehavior.csv", TAOBAO), ["pv"])
    assert ds.interactions.n_events == 3  # the buy is not a click
    assert ds.interactions.timestamp.tolist() == [1511544070, 1511544080, 1511544000]
    assert ds.catalog.item_ids.tolist() == ["10", "11"]
    assert ds.catalog.item_text() == ["category 100", "category 100"]
    both = load_taobao_userbehavior(write(tmp_path / "UserBehavior.csv", TAOBAO), ["pv", "buy"])
    assert both.interactions.n_events == 4


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        (TAOBAO + "3,13,100,like,1511544090\n", r"column 'behavior', line 5: unknown behavior 'like'"),
        (TAOBAO + "3,13,100,pv,soon\n", r"column 'timestamp', line 5: unparsable timestamp 'soon'"),
        (TAOBAO + "3,13,100,pv\n", r"column 'timestamp', line 5: empty value"),
        (TAOBAO + "3,13,100,pv,1,7\n", r"malformed CSV: Expected 5 fields in line 5, saw 6"),
    ],
    ids=["bad-behavior", "bad-timestamp", "short-row", "long-row"],
)
def test_taobao_violations(tmp_path: Path, text: str, pattern: str) -> None:
    with pytest.raises(DataValidationError, match=pattern):
        load_taobao_userbehavior(write(tmp_path / "UserBehavior.csv", text), ["pv"])


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"toy.inter": INTER_HEADER + "u1\t1\t5\t1\t9\n"}, "malformed TSV"),
        ({"toy.inter": ""}, "file is empty"),
        ({"toy.inter": GOOD_INTER, "toy.item": GOOD_ITEMS + "1\tDup\tX\n"}, "duplicate id '1'"),
    ],
    ids=["malformed", "empty", "duplicate-ids"],
)
def test_cli_prints_one_error_line_without_traceback(tmp_path: Path, files: dict[str, str], expected: str) -> None:
    for name, text in files.items():
        write(tmp_path / "toy" / name, text)
    result = subprocess.run(
        [KARMA_BIN, "data", "stats", f"recbole:{tmp_path / 'toy'}", "--set", f"paths.artifacts={tmp_path / 'a'}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and expected in error_lines[0], result.stderr


def test_cli_malformed_taobao_csv(tmp_path: Path) -> None:
    path = write(tmp_path / "ub.csv", "1,10,100,pv\n")
    result = subprocess.run(
        [KARMA_BIN, "data", "stats", f"taobao-userbehavior:{path}", "--set", f"paths.artifacts={tmp_path / 'a'}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {path}, column 'timestamp', line 1: empty value")
