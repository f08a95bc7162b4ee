"""The stage runner behind `speedrun` and `ablate`: every stage is skipped when an earlier run already
produced its outputs from the same inputs.

A stage's inputs fingerprint is `home.fingerprint` of the config it reads plus its upstream stages'
fingerprints, so changing `train.lr` reruns pretraining and everything after it, but not the tokenizer.
Records live in $NANOFORGE_HOME/pipeline/<stage>-<fingerprint>.json (shared by every run: two ablation
cells with the same tokenizer settings train it once); a record counts only while the paths it lists
under `outputs` still exist. Each run also keeps runs/<run>/stages.json (what ran, what was skipped,
seconds) and runs/<run>/log.txt (the full log).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoforge import home, progress
from nanoforge.errors import NanoforgeError


class Interrupted(NanoforgeError):
    """A stage stopped on Ctrl-C/SIGTERM after saving its progress; rerunning the command continues."""

    exit_code = 130


@dataclass
class StageResult:
    name: str
    fingerprint: str
    result: dict[str, Any]
    seconds: float
    skipped: bool


@dataclass
class StageRunner:
    """Runs the stages of one run (`runs/<run>/`). `fresh=True` redoes every stage once in this process
    (a stage shared by several ablation cells is still redone only once)."""

    run: str
    fresh: bool = False
    rank: int = 0        # under torchrun: ranks > 0 wait for rank 0's records instead of running stages
    total: int = 0
    done_now: set[str] = field(default_factory=set)  # fingerprints (re)made in this process
    results: dict[str, StageResult] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.run_dir = home.run_dir(self.run)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.started = time.perf_counter()
        self.created = time.time()

    @staticmethod
    def record_path(name: str, fp: str) -> Path:
        return home.home() / "pipeline" / f"{name}-{fp}.json"

    def fingerprint(self, name: str, inputs: dict[str, Any]) -> str:
        return home.fingerprint({"stage": name, **inputs})

    def lookup(self, name: str, fp: str) -> dict[str, Any] | None:
        """The stored result of stage `name` with inputs `fp`, if every output it lists still exists."""
        path = self.record_path(name, fp)
        if not path.is_file():
            return None
        try:
            record = home.read_json(path, "stage record")
        except NanoforgeError:
            return None
        result = record.get("result")
        if not isinstance(result, dict) or not all(Path(p).exists() for p in result.get("outputs", [])):
            return None
        return record

    def stage(self, name: str, inputs: dict[str, Any], fn: Callable[[str], dict[str, Any]], *,
              cache: bool = True, all_ranks: bool = False) -> StageResult:
        """Run `fn(fingerprint) -> result dict` unless a matching record exists (and not `fresh`).
        `inputs` must be JSON-serialisable; include upstream fingerprints. `cache=False` always runs.
        Under torchrun, ranks > 0 wait for rank 0's record unless `all_ranks` (they run `fn` too)."""
        fp = self.fingerprint(name, inputs)
        index = len(self.results) + 1
        label = f"[{index}/{self.total or '?'}] {name}"
        record = None if not cache or (self.fresh and fp not in self.done_now) else self.lookup(name, fp)
        if record is None and self.rank > 0 and cache and not all_ranks:
            record = self.wait_for(name, fp)
        say = progress.log if self.rank == 0 else (lambda msg: None)
        if record is not None:
            res = StageResult(name, fp, record["result"], float(record.get("seconds", 0.0)), True)
            say(f"{label}: up to date (made in {_fmt(res.seconds)}), skipped")
        else:
            say(f"{label} ...")
            t0 = time.perf_counter()
            result = fn(fp)
            seconds = time.perf_counter() - t0
            res = StageResult(name, fp, result, seconds, False)
            if cache and self.rank == 0 and not result.get("skipped"):  # partial results are redone next time
                home.atomic_write_json(self.record_path(name, fp), {
                    "stage": name, "fingerprint": fp, "inputs": inputs, "result": result,
                    "seconds": round(seconds, 3), "run": self.run, "time": time.time()})
            self.done_now.add(fp)
            say(f"{label}: done in {_fmt(seconds)}")
        self.results[name] = res
        self.save_state()
        return res

    def wait_for(self, name: str, fp: str, poll: float = 2.0) -> dict[str, Any]:
        """(ranks > 0) Block until rank 0 has written the record of stage `name` with inputs `fp`."""
        progress.log(f"rank {self.rank}: waiting for rank 0 to finish stage {name}")
        while True:
            record = self.lookup(name, fp)
            if record is not None and (not self.fresh or record.get("time", 0) >= self.created):
                return record
            time.sleep(poll)

    def save_state(self) -> None:
        if self.rank > 0:
            return
        home.atomic_write_json(self.run_dir / "stages.json", {
            "run": self.run,
            "stages": {n: {"fingerprint": r.fingerprint, "seconds": round(r.seconds, 3), "skipped": r.skipped,
                           "result": r.result} for n, r in self.results.items()}})


@contextlib.contextmanager
def log_to_file(path: Path) -> Iterator[None]:
    """Tee the `nanoforge` logger (INFO and up) into `path` (appending) for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("nanoforge")
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    old_level = logger.level
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(old_level)


def _fmt(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.1f} min"
