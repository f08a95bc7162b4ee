"""Where nanoforge keeps things ($NANOFORGE_HOME, default ~/.cache/nanoforge) and how it writes them:
every output goes to a temporary path first and is renamed into place, so an interrupted job never
leaves a half-written file or folder behind.

    tokenizers/<name>/  corpora/<name>/  tokens/<name>/  checkpoints/<phase>/<tag>/  exports/<tag>/  runs/<run>/
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nanoforge.errors import UserError


def home() -> Path:
    """The data home: $NANOFORGE_HOME, else ~/.cache/nanoforge (not created here)."""
    env = os.environ.get("NANOFORGE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nanoforge"


def tokenizer_dir(name: str) -> Path:
    return home() / "tokenizers" / name


def corpus_dir(name: str) -> Path:
    return home() / "corpora" / name


def tokens_dir(name: str) -> Path:
    return home() / "tokens" / name


def checkpoint_dir(phase: str, tag: str) -> Path:
    return home() / "checkpoints" / phase / tag


def export_dir(tag: str) -> Path:
    return home() / "exports" / tag


def run_dir(run: str) -> Path:
    return home() / "runs" / run


def resolve(name_or_path: str | os.PathLike, kind: str) -> Path:
    """A folder given either as a path (contains a slash, or exists) or as a name under home()/<kind>/."""
    p = Path(name_or_path).expanduser()
    if p.exists() or os.sep in str(name_or_path) or str(name_or_path).startswith("."):
        return p
    return home() / kind / str(name_or_path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; rename it onto `path` when the block succeeds.
    For writers that want a filename (pyarrow, safetensors, torch.save)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, force: bool = False, what: str = "output folder") -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; when the block succeeds it replaces `path`.
    Refuses (UserError) when `path` exists and `force` is false. On any error or interrupt the
    temporary folder is removed and an existing `path` is left untouched."""
    path = Path(path)
    if path.exists() and not force:
        raise UserError(f"{what} {path} already exists (use --force to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old.{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-serialisable object (16 hex digits of sha256)."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def file_fingerprint(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 (16 hex digits) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


def read_cache(name: str) -> dict[str, Any]:
    """$NANOFORGE_HOME/cache/<name>.json (measurements of this machine); {} when absent or broken, so that
    a damaged cache is measured again instead of stopping a run."""
    path = home() / "cache" / f"{name}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_cache(name: str, data: dict[str, Any]) -> None:
    """Atomically replace cache/<name>.json; a read-only home only loses the cache."""
    try:
        atomic_write_json(home() / "cache" / f"{name}.json", data)
    except OSError:
        pass


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Load JSON, turning a missing or broken file into a one-line UserError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path} is not valid JSON: {e}") from None
