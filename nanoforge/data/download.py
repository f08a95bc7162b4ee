"""Download parquet shards of a Hugging Face dataset (karpathy/fineweb-edu-100b-shuffle,
stefan-it/nanochat-german-data, ...) through `huggingface_hub`, so HF_ENDPOINT, HF_TOKEN and offline mode
apply as usual.

    nanoforge data download karpathy/fineweb-edu-100b-shuffle --shards 0-7 --workers 4

Parallel (threads; the work is network I/O), resumable (a verified shard already in the folder is skipped;
an interrupted one continues from huggingface_hub's `.incomplete` file), retried with exponential backoff,
and verified (opens as parquet with a `text` column) before it is moved into place, so the folder never
holds a half-written or foreign shard.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

from nanoforge import home, progress
from nanoforge.data import corpus as corpus_mod
from nanoforge.errors import NanoforgeError, UserError

STAGING = ".download"  # huggingface_hub's local_dir (partial files, metadata) inside the output folder


def parse_shards(spec: str | int) -> list[int]:
    """`0-7`, `0,3,5-6` or `3` as a sorted list of shard indices."""
    out: set[int] = set()
    try:
        for part in str(spec).split(","):
            lo, _, hi = part.strip().partition("-")
            a, b = int(lo), int(hi) if hi else int(lo)
            if a < 0 or b < a:
                raise ValueError
            out.update(range(a, b + 1))
    except ValueError:
        raise UserError(f"--shards {spec!r}: expected indices like 0-7, 0,3,5-6 or 3") from None
    return sorted(out)


def _verify(path: Path, column: str) -> None:
    pf = corpus_mod.parquet_file(path, column)  # UserError names the file and the problem
    if pf.metadata.num_rows == 0:
        raise UserError(f"{path}: parquet shard has no rows")


def download_shards(repo: str, shards: list[int] | str, out: str | os.PathLike | None = None, *,
                    revision: str | None = None, workers: int = 4, pattern: str = "shard_{:05d}.parquet",
                    retries: int = 5, backoff: float = 1.0, column: str = "text") -> list[Path]:
    """Download shards `shards` (indices, file names from `pattern`) of dataset `repo` into `out` (default
    $NANOFORGE_HOME/corpora/<repo name>); returns their paths in shard order. A missing repository or file
    and a shard that is not parquet with `column` are UserErrors (the bad file is deleted); network
    failures are retried `retries` times with backoff doubling from `backoff` seconds."""
    if isinstance(shards, str):
        shards = parse_shards(shards)
    if retries < 1:
        raise UserError(f"--retries must be at least 1 (attempts per shard), got {retries}")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    names = _shard_names(pattern, shards)
    out = Path(out) if out is not None else home.corpus_dir(home.slug(repo.rstrip("/").split("/")[-1]))
    with home.lock(out, "corpus folder"):
        out.mkdir(parents=True, exist_ok=True)
        return _download(repo, names, out, revision, workers, retries, backoff, column)


def _shard_names(pattern: str, shards: list[int]) -> list[str]:
    """File names of the shards in the repository; a UserError for a pattern that does not format an index
    or that points outside the output folder."""
    try:
        names = [pattern.format(i) for i in shards]
    except (ValueError, IndexError, KeyError, TypeError) as e:
        raise UserError(f"--pattern {pattern!r} is not a file name pattern for the shard index ({e}); "
                        f"example: shard_{{:05d}}.parquet") from None
    for name in names:
        parts = Path(name).parts
        if not name or Path(name).is_absolute() or ".." in parts:
            raise UserError(f"--pattern {pattern!r} gives {name!r}: shard names must be relative paths inside "
                            f"the dataset (no '..', no leading '/')")
    return names


def _download(repo: str, names: list[str], out: Path, revision: str | None, workers: int, retries: int,
              backoff: float, column: str) -> list[Path]:
    todo = []
    for name in names:
        final = out / name
        if final.exists():
            try:
                _verify(final, column)
                continue
            except UserError:
                final.unlink()  # a foreign or damaged file: fetch it again
        todo.append(name)
    if len(todo) < len(names):
        progress.log(f"{len(names) - len(todo)} of {len(names)} shard(s) already in {out}")
    if todo and _offline():
        raise UserError(f"cannot download {len(todo)} shard(s) of {repo}: offline mode is on (HF_HUB_OFFLINE); "
                        f"unset it, or bring local files in with `nanoforge data import`")
    lock = threading.Lock()
    total = progress.bar(desc=f"download {repo}", unit="B", unit_scale=True, total=0)

    class _Forward(tqdm):  # huggingface_hub's per-file bars feed one aggregate bar (MB/s, ETA)
        def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            with lock:
                total.total = (total.total or 0) + (kwargs.get("total") or 0) - (kwargs.get("initial") or 0)
                total.refresh()

        def update(self, n: float | None = 1) -> bool | None:
            with lock:
                total.update(n or 0)
            return None

    def fetch(name: str) -> Path:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        staging = out / STAGING
        for attempt in range(retries):
            try:
                path = Path(hf_hub_download(repo, name, repo_type="dataset", revision=revision,
                                            local_dir=staging, tqdm_class=_Forward))
                break
            except (GatedRepoError, RepositoryNotFoundError):
                raise UserError(f"dataset {repo!r} not found or not accessible (check the name, or set HF_TOKEN "
                                f"for a gated/private dataset)") from None
            except RevisionNotFoundError:
                raise UserError(f"dataset {repo!r} has no revision {revision!r}") from None
            except EntryNotFoundError:
                raise UserError(f"dataset {repo!r} has no file {name!r} (check --shards and --pattern)") from None
            except OfflineModeIsEnabled:
                raise UserError(f"cannot download {repo}/{name}: offline mode (HF_HUB_OFFLINE) is on") from None
            except Exception as e:  # network trouble: back off and try again
                if attempt == retries - 1:
                    raise NanoforgeError(f"downloading {repo}/{name} failed {retries} times, last: "
                                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                                         f"(rerun to resume)") from None
                delay = backoff * 2 ** attempt
                progress.warn(f"{name}: {type(e).__name__}, retrying in {delay:.1f}s")
                time.sleep(delay)
        try:
            _verify(path, column)
        except UserError as e:
            path.unlink(missing_ok=True)
            raise UserError(f"downloaded {repo}/{name} is not a usable shard: {e}") from None
        final = out / name
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, final)
        return final

    try:
        if todo:
            with ThreadPoolExecutor(max(1, min(workers, len(todo)))) as pool:
                list(pool.map(fetch, todo))
    finally:
        total.close()
    staging = out / STAGING
    if staging.exists() and not any(p.suffix == ".incomplete" for p in staging.rglob("*")):
        shutil.rmtree(staging, ignore_errors=True)
    return [out / n for n in names]


def _offline() -> bool:
    """huggingface_hub's offline switch (read when it was imported), or HF_HUB_OFFLINE set since."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE) or env
