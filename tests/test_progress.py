"""karma.progress: redrawn bars on a terminal, short newline-terminated lines in a log file."""

from __future__ import annotations

import io
import logging

import pytest

import karma.progress
from karma.progress import progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_non_tty_output_is_short_lines_not_one_carriage_return_line() -> None:
    log = io.StringIO()
    bar = progress_bar(range(2000), desc="train", file=log, interval=0)  # interval 0: a line every update
    for i in bar:
        bar.set_postfix({f"loss_{k}": f"{i / 7:.3f}" for k in range(8)}, refresh=False)
    text = log.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and text.endswith("\n")
    assert len(lines) >= 2000 and all(0 < len(line) < 300 for line in lines), max(lines, key=len)
    assert lines[0].startswith("train:   0%") and lines[-1].startswith("train: 100%|##########| 2000/2000")


def test_non_tty_default_prints_start_percent_steps_and_end_only(monkeypatch: pytest.MonkeyPatch) -> None:
    def run() -> list[str]:
        log = io.StringIO()
        with progress_bar(total=100_000, desc="events", unit="ev", file=log) as bar:
            for _ in range(1000):
                bar.update(100)
        return log.getvalue().splitlines()

    lines = run()
    assert len(lines) == 2  # a fast loop: no 30 s interval and no percent step 1 s apart, only start and end
    assert lines[0].startswith("events:   0%") and "100000/100000" in lines[1]
    monkeypatch.setattr(karma.progress, "_MIN_GAP_S", 0.0)  # as if every 10% took over a second
    lines = run()
    assert [line.split("|")[0] for line in lines] == [f"events: {p:3d}%" for p in range(0, 101, 10)]
    assert all(len(line) < 300 for line in lines)


def test_non_tty_new_postfix_or_description_prints_no_line() -> None:
    log = io.StringIO()
    bar = progress_bar(total=3, desc="karma bench", unit="step", file=log)
    for i in range(3):
        bar.set_postfix_str(f"step {i}")
        bar.set_description(f"bench {i}")
        bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and lines[-1].startswith("bench 2: 100%") and lines[-1].endswith("step 2]")


def test_non_tty_log_lines_printed_meanwhile_stay_whole() -> None:
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    logger = logging.getLogger("test.progress")
    logger.addHandler(handler)
    try:
        bar = progress_bar(range(3), desc="steps", file=log, interval=0)
        for i in bar:
            logger.warning("step %d done", i)
    finally:
        logger.removeHandler(handler)
    lines = log.getvalue().splitlines()
    assert "step 0 done" in lines and "step 2 done" in lines
    assert all(line.startswith(("steps:", "step ")) for line in lines)


def test_a_terminal_gets_the_redrawn_tqdm_bar() -> None:
    screen = Terminal()
    for _ in progress_bar(range(50), desc="train", file=screen, mininterval=0):
        pass
    assert "\r" in screen.getvalue() and screen.getvalue().count("\n") <= 1


def test_disabled_bar_writes_nothing() -> None:
    log = io.StringIO()
    assert list(progress_bar(range(5), file=log, disable=True)) == [0, 1, 2, 3, 4]
    assert log.getvalue() == ""
