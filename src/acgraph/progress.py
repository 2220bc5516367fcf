"""Progress bars that also work in logs.

On a terminal this is a plain tqdm bar. When stderr is not a terminal (``nohup``, CI, a job
writing to a file), tqdm would either stay silent (``disable=None``) or fill the file with
carriage-return redraws; a long job in the background then gives no sign of life. There the bar
writes one plain line (``desc: n/total [elapsed<remaining, rate, postfix]``) at most once per
``LOG_INTERVAL_S`` and none at all for jobs shorter than that, so quick runs (tests) print nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm
from tqdm.std import tqdm as plain_tqdm

LOG_INTERVAL_S = 60.0
LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class _LogLines(plain_tqdm):
    """A tqdm whose every refresh is one newline-terminated line (written by the rate limiter)."""

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        start = getattr(self, "start_t", None)  # unset during tqdm's own __init__ refresh
        if start is None or self._time() - start < LOG_INTERVAL_S:
            return True
        if self.n == getattr(self, "_written_n", None):  # close() repeats the last refresh
            return True
        self.fp.write((msg or self.__str__()).strip() + "\n")
        self.fp.flush()
        self._written_n = self.n
        return True


class _DropBlank:
    """stderr without the bare newlines and carriage returns tqdm writes around its redraws."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        if text.strip():
            self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(
    iterable: Iterable[Any] | None = None, *, enabled: bool = True, **kwargs: Any
) -> tqdm:
    """A tqdm bar (``kwargs`` as tqdm's) that is silent when not ``enabled``."""
    if not enabled:
        return tqdm(iterable, disable=True, **kwargs)
    if sys.stderr.isatty():
        return tqdm(iterable, **kwargs)
    kwargs.setdefault("mininterval", LOG_INTERVAL_S)
    kwargs.pop("dynamic_ncols", None)
    kwargs.setdefault("bar_format", LOG_FORMAT)
    return _LogLines(iterable, file=_DropBlank(sys.stderr), **kwargs)
