"""The one progress/logging helper. Library code never prints: it calls `log()` and wraps long
work in `bar()`. The CLI decides what the user sees (`enable()`), a speedrun also tees to a log file."""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tqdm import tqdm

logger = logging.getLogger("nanoforge")
_bars_enabled = False


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the call (tests and log tees swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001
        pass


def enable(bars: bool = True, level: int = logging.INFO) -> None:
    """Show log lines on stderr and progress bars (called by the CLI, not by library code)."""
    global _bars_enabled
    _bars_enabled = bars and sys.stderr.isatty()
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def force_bars(on: bool = True) -> None:
    """Show bars even when stderr is not a terminal (log files, CI logs)."""
    global _bars_enabled
    _bars_enabled = on


def log(msg: str, *args: Any) -> None:
    logger.info(msg, *args)


def warn(msg: str, *args: Any) -> None:
    logger.warning(msg, *args)


def bar(iterable: Any = None, *, total: float | None = None, desc: str = "", unit: str = "it",
        unit_scale: bool = False, **kwargs: Any) -> tqdm:
    """A tqdm bar (rate and ETA included) that is silent unless the CLI enabled bars. tqdm is imported here,
    not at module load: every command imports this module, few draw a bar."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale,
                disable=not _bars_enabled, dynamic_ncols=True, file=sys.stderr, **kwargs)
