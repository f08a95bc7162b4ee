"""Where nanoforge keeps things ($NANOFORGE_HOME, default ~/.cache/nanoforge) and how it writes them.

    tokenizers/<name>/  corpora/<name>/  tokens/<name>/  checkpoints/<phase>/<tag>/  exports/<tag>/  runs/<run>/

The rules every writing command follows, all implemented here:
- names (`--tag`, `--name`, `--run`) are one path component of letters, digits and `._-` (`check_name`);
  folders elsewhere are given as paths (`--out`);
- an output is held by one process at a time: `with lock(path, what):` takes `.<name>.lock` beside it
  (pid, host, start time inside; the kernel drops the lock when the process dies, and the next holder
  says it took over a stale one and removes the temporaries the dead process left);
- every output goes to a temporary path first and is renamed into place, so an interrupted job never
  leaves a half-written file or folder behind, and `--force` replaces a finished output only at the end
  (`atomic_dir`, `replace_dir`);
- files are 0644 and folders 0755 under the user's umask, as `open()` and `mkdir()` give.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nanoforge.errors import UserError


def home() -> Path:
    """The data home: $NANOFORGE_HOME, else ~/.cache/nanoforge (not created here). A UserError when it
    exists but is not a folder."""
    env = os.environ.get("NANOFORGE_HOME")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "nanoforge"
    if path.exists() and not path.is_dir():
        raise UserError(f"the data home {path} is a file, not a folder: point NANOFORGE_HOME at a folder")
    return path


# `=` and `+` too: ablation cells are named after their values (`grid--lr=0.001`)
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._=+-]{0,199}")


def check_name(name: str, what: str = "name") -> str:
    """`name` if it is a single path component of letters, digits and `._-` (`=+` allowed) that does not
    start with `.` (our temporaries and locks) or `-`; otherwise a UserError. Names never smuggle paths out
    of the home."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise UserError(f"{what} {name!r} is not a valid name: use letters, digits, '.', '_' and '-' "
                        f"(one path component, not starting with '.' or '-'); give folders as paths with --out")
    return name


def slug(text: str) -> str:
    """A valid name made from any text (for default names derived from file names, repositories, values)."""
    s = re.sub(r"[^A-Za-z0-9._=+-]+", "-", str(text)).strip("-.")
    return s[:200] or "unnamed"


def tokenizer_dir(name: str) -> Path:
    return home() / "tokenizers" / check_name(name, "tokenizer name")


def corpus_dir(name: str) -> Path:
    return home() / "corpora" / check_name(name, "corpus name")


def tokens_dir(name: str) -> Path:
    return home() / "tokens" / check_name(name, "token folder name")


def checkpoint_dir(phase: str, tag: str) -> Path:
    return home() / "checkpoints" / check_name(phase, "phase") / check_name(tag, "tag")


def export_dir(tag: str) -> Path:
    return home() / "exports" / check_name(tag, "export name")


def run_dir(run: str) -> Path:
    return home() / "runs" / check_name(run, "run name")


def resolve(name_or_path: str | os.PathLike, kind: str) -> Path:
    """A folder given either as a path (contains a slash, or exists) or as a name under home()/<kind>/."""
    p = Path(name_or_path).expanduser()
    if p.exists() or os.sep in str(name_or_path) or str(name_or_path).startswith("."):
        return p
    return home() / kind / str(name_or_path)


# --- file modes ---------------------------------------------------------------------------------------
def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask sets it, racing threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def file_mode() -> int:
    """What `open()` gives a new file: 0644 under umask 022 (mkstemp's temporaries are 0600)."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """What `mkdir()` gives a new folder: 0755 under umask 022 (mkdtemp's are 0700)."""
    return 0o777 & ~_umask()


# --- writability, locks, stale temporaries ---------------------------------------------------------------
def ensure_parent(path: str | os.PathLike, what: str = "output") -> Path:
    """Create the folder `path` goes into; a one-line UserError when that is impossible (a parent is a
    file, a folder is read-only). Call it before long work so it does not fail at the end."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocker = next((p for p in [path.parent, *path.parent.parents] if p.exists()), path.parent)
        why = f"{blocker} is not a folder" if not blocker.is_dir() else f"{e.strerror.lower()} in {blocker}"
        raise UserError(f"cannot write {what} {path}: {why}") from None
    if not path.parent.is_dir():
        raise UserError(f"cannot write {what} {path}: {path.parent} is not a folder")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {what} {path}: {path.parent} is not writable")
    if path.exists() and path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {what} {path}: the folder is not writable")
    return path


_held: dict[str, list[Any]] = {}  # lock file -> [fd, depth]: a process may take the same lock again
_held_guard = threading.Lock()


def _describe(holder: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder.get("since", 0)))
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {since}"


def _read_holder(fd: int) -> dict[str, Any] | None:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of an output: `.<name>.lock` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def lock(path: str | os.PathLike, what: str = "output") -> Iterator[Path]:
    """Hold the exclusive lock of output `path` (a folder or a file) for the block. Another process that
    asks for it gets a UserError naming the holder (pid, host, since when). The kernel releases the lock
    when its process ends, however it ends; the next holder says in one line that it took over a stale
    lock, and removes the temporaries the dead process left (`clean_stale`). Taking a lock this process
    already holds is allowed (nested library calls). Checks that the output can be written (`ensure_parent`)."""
    path = Path(os.path.abspath(Path(path).expanduser()))
    lp = lock_path(path)
    key = str(lp)
    with _held_guard:
        if key in _held:
            _held[key][1] += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield path
        finally:
            with _held_guard:
                _held[key][1] -= 1
        return
    ensure_parent(path, what)
    fd = _acquire(lp, path, what)
    with _held_guard:
        _held[key] = [fd, 1]
    try:
        clean_stale(path)
        yield path
    finally:
        with _held_guard:
            _held[key][1] -= 1
            last = _held[key][1] == 0
            if last:
                del _held[key]
        if last:
            with contextlib.suppress(OSError):
                os.unlink(lp)  # before closing: whoever opened it meanwhile sees a new inode and retries
            os.close(fd)


def _acquire(lp: Path, path: Path, what: str) -> int:
    from nanoforge import progress

    while True:
        try:
            fd = os.open(lp, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise UserError(f"cannot write {what} {path}: {e.strerror.lower()} ({lp})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise UserError(f"cannot lock {what} {path}: {e.strerror.lower()} ({lp})") from None
            who = _describe(holder) if holder else "another process"
            raise UserError(f"{what} {path} is in use by {who}; wait for it to finish or stop it "
                            f"(lock file {lp})") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lp).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # its last holder removed it between our open and our lock: take the new one
            os.close(fd)
            continue
        old = _read_holder(fd)
        if old and old.get("pid") != os.getpid():
            progress.warn(f"took over the stale lock of {what} {path}: {_describe(old)} is no longer running")
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": round(time.time(), 3)})
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode("utf-8"), 0)
        return fd


def clean_stale(path: str | os.PathLike) -> list[Path]:
    """Remove what interrupted writers of `path` left: `.<name>.*.tmp` temporaries beside it and `.*.tmp`
    inside it; a `.<name>.old.*` copy is put back when a replacement stopped between its two renames.
    Only call it while holding `lock(path)`: then no other writer can be using them. Returns what went."""
    path = Path(path)
    removed: list[Path] = []
    parent = path.parent
    if not parent.is_dir():
        return removed
    name = re.escape(path.name)
    tmp_re = re.compile(rf"\.{name}\.(\d+\.)?([A-Za-z0-9_]{{8}}\.)?tmp")  # .<name>.<pid>.<random>.tmp
    old_re = re.compile(rf"\.{name}\.old\.\d+")
    siblings = sorted(parent.iterdir())
    olds = [p for p in siblings if old_re.fullmatch(p.name)]
    if olds and not path.exists():
        os.replace(olds.pop(), path)
    candidates = [p for p in siblings if tmp_re.fullmatch(p.name)] + olds
    if path.is_dir():
        candidates += [p for p in path.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
    for p in candidates:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        removed.append(p)
    return removed


# --- atomic writes -----------------------------------------------------------------------------------------
def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same folder and an atomic rename."""
    path = ensure_parent(path, "file")
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
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
    path = ensure_parent(path, "file")
    tmp = path.with_name(f"{_tmp_prefix(path)}tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


def replace_dir(new: str | os.PathLike, path: str | os.PathLike) -> None:
    """Put the finished folder `new` at `path`, replacing what is there in one atomic swap where the
    system allows it (else two renames; `clean_stale` restores the old folder if a crash falls between)."""
    new, path = Path(new), Path(path)
    if not path.exists():
        os.replace(new, path)
        return
    if _exchange(new, path):
        shutil.rmtree(new, ignore_errors=True)  # `new` now holds the old output
        return
    old = path.with_name(f".{path.name}.old.{os.getpid()}")
    os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, force: bool = False, what: str = "output folder") -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; when the block succeeds it replaces `path` (see
    `replace_dir`). Holds `lock(path)` throughout. Refuses (UserError) when `path` exists and `force` is
    false. On any error or interrupt the temporary folder is removed and an existing `path` is untouched."""
    path = Path(path)
    with lock(path, what):
        if path.exists() and not force:
            raise UserError(f"{what} {path} already exists (use --force to replace it)")
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent))
        try:
            os.chmod(tmp, dir_mode())
            yield tmp
            replace_dir(tmp, path)
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
