"""Progress bars that suit both a terminal and a log file (every bar in the project comes from here).

On a terminal (or in Jupyter) `progress_bar()` is plain `tqdm.auto.tqdm`: one line redrawn in place. When
the output is not interactive (redirected to a file, CI, `kubectl logs`), tqdm's in-place redraws
are `\\r` updates that a log file keeps as one ever-growing line (34,838 characters from one training
run). There, `progress_bar()` instead writes a short, newline-terminated status line when the bar
starts, every `interval` seconds, at every `percent_step` % reached (at most one a second), and at
the end (a new description or postfix alone prints nothing); nothing else reaches the stream, so log
lines printed in between stay intact.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from typing import IO, Any

from tqdm import tqdm as _std_tqdm

LOG_INTERVAL_S = 30.0  # non-interactive output: a status line at least this often while the bar moves
LOG_PERCENT_STEP = 10  # ... and one at every multiple of this many percent of a known total
_MIN_GAP_S = 1.0  # percent lines never come closer together than this (fast loops print start and end)


def is_interactive(stream: Any) -> bool:
    """Whether `stream` shows a redrawn bar to a person: a TTY, or any output inside a Jupyter kernel."""
    try:
        if stream.isatty():
            return True
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed file
        return False
    ipython = sys.modules.get("IPython")
    try:
        shell = ipython.get_ipython() if ipython is not None else None
        return shell is not None and "IPKernelApp" in shell.config
    except Exception:  # an IPython that is not set up as expected is not a notebook
        return False


class _OnlyLines:
    """File wrapper that drops tqdm's cursor control (bare `\\r`, `\\n`, blank padding); lines pass."""

    def __init__(self, stream: IO[str]):
        self.stream = stream

    def write(self, text: str) -> int:
        if text.strip():
            self.stream.write(text)
        return len(text)

    def flush(self) -> None:
        flush = getattr(self.stream, "flush", None)
        if flush is not None:
            flush()


class LogLinesTqdm(_std_tqdm):
    """tqdm that prints each status as its own short line (for log files), never `\\r` redraws."""

    _shown_n: float | None = None
    _shown_step = -1
    _shown_at = float("-inf")
    _closing = False

    def __init__(self, *args: Any, percent_step: int = LOG_PERCENT_STEP, **kwargs: Any):
        self._percent_step = percent_step  # set first: tqdm's __init__ already displays the bar
        super().__init__(*args, **kwargs)

    def _step_of(self, n: float) -> int:
        if not self.total or self._percent_step <= 0:
            return -1
        return int(100 * n / self.total) // self._percent_step

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg == "":  # tqdm clearing the bar: nothing to erase in a log
            return True
        if self._closing and self.n == self._shown_n:  # the last status line is already the final one
            return True
        line = (msg if msg is not None else self.__str__()).rstrip()
        self.fp.write(line + "\n")
        self.fp.flush()
        self._shown_n, self._shown_step, self._shown_at = self.n, self._step_of(self.n), time.monotonic()
        return True

    # A new description or postfix alone is no reason for a log line: the next status line shows it.
    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        super().set_description(desc, refresh=False)

    def set_description_str(self, desc: str | None = None, refresh: bool = True) -> None:
        super().set_description_str(desc, refresh=False)

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        super().set_postfix(ordered_dict, refresh=False, **kwargs)

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        super().set_postfix_str(s, refresh=False)

    def clear(self, nolock: bool = False) -> None:
        """Nothing to clear: every status is its own line."""

    def moveto(self, n: int) -> None:
        """No cursor movement in a log (nested bars print their lines one after another)."""

    def update(self, n: float = 1) -> bool | None:
        shown = super().update(n)
        if shown or self.disable:
            return shown
        if self._step_of(self.n) > self._shown_step and time.monotonic() - self._shown_at >= _MIN_GAP_S:
            self.refresh()
            self.last_print_n, self.last_print_t = self.n, self._time()
            return True
        return shown

    def __iter__(self):
        """Like tqdm's, but through `update` (tqdm's inlined loop would skip the percent lines)."""
        if self.disable:
            yield from self.iterable
            return
        try:
            for obj in self.iterable:
                yield obj
                self.update(1)
        finally:
            self.close()

    def close(self) -> None:
        self._closing = True
        super().close()


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    file: IO[str] | None = None,
    interval: float = LOG_INTERVAL_S,
    percent_step: int = LOG_PERCENT_STEP,
    interactive: bool | None = None,
    **kwargs: Any,
) -> _std_tqdm:
    """A tqdm bar over `iterable` (or `total=`), with tqdm's keyword arguments (desc, unit, disable, ...).

    `file` defaults to stderr, as tqdm's. `interactive` (default: `file` is a TTY or Jupyter) picks the
    redrawn bar; otherwise status lines go out every `interval` seconds and at every `percent_step` %.
    """
    stream = sys.stderr if file is None else file
    if interactive is None:
        interactive = is_interactive(stream)
    if interactive:
        from tqdm.auto import tqdm

        return tqdm(iterable, file=stream, **kwargs)
    kwargs.setdefault("mininterval", interval)
    kwargs.setdefault("maxinterval", kwargs["mininterval"])  # tqdm's monitor thread: no line sooner either
    kwargs.setdefault("ascii", True)
    return LogLinesTqdm(iterable, file=_OnlyLines(stream), percent_step=percent_step, **kwargs)
