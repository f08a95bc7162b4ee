"""The offline default corpus: English text from the docstrings of the Python standard library installed
on this machine, one document per module (its docstring, then each class, method and function with its
signature and docstring). Nobody's text is committed to the repository and no network is needed; the
result is deterministic for a given Python version (modules, members and shards in sorted order).

    build_stdlib_corpus()            # -> $NANOFORGE_HOME/corpora/stdlib-py3.11/shard_00000.parquet ...

Modules are imported in a child process (stdout/stderr silenced, one overall timeout), so an import with
side effects can never touch the caller; modules known to open windows, browsers or print on import, the
test suites and anything that fails to import are skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from nanoforge import home, progress
from nanoforge.errors import NanoforgeError

# Top-level modules never imported: side effects (GUI, browser, printing), test suites, internals.
SKIP = {
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "__main__",
    "ensurepip", "pydoc_data", "venv", "xxsubtype", "xxlimited", "xxlimited_35", "_xxtestfuzz",
    "_testcapi", "_testinternalcapi", "_testbuffer", "_testimportmultiple", "_testmultiphase",
    "_testclinic", "_testsinglephase", "_ctypes_test", "msilib", "winreg", "winsound", "_winapi",
    "msvcrt", "nt", "_msi", "_overlapped", "_wmi", "distutils", "sre_compile", "sre_constants",
    "sre_parse", "imp", "asynchat", "asyncore", "smtpd", "site", "sitecustomize",
    "usercustomize", "_pydecimal", "_pyio", "_pydatetime", "_pylong",
}
SHARD_DOCS = 100  # documents per parquet shard
MIN_CHARS = 200   # modules with less documentation than this are dropped
META = ".stdlib-corpus.json"  # hidden: corpus readers take every .json file for documents
VERSION = 2  # 2: signatures no longer show this machine's environment or paths (os.environ, sys.executable)


def corpus_name() -> str:
    return f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}"


def build_stdlib_corpus(out: str | os.PathLike | None = None, *, force: bool = False,
                        timeout: float = 600.0) -> Path:
    """Write the stdlib docstring corpus as parquet shards (column `text`) to `out` (default
    corpora/stdlib-pyX.Y) and return the folder; an existing complete corpus is reused unless `force`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out) if out else home.corpus_dir(corpus_name())
    if (out / META).is_file() and not force and _version(out / META) == VERSION:
        return out
    docs = collect_documents(timeout=timeout)
    with home.atomic_dir(out, force=True, what="corpus folder") as tmp:
        for i in range(0, len(docs), SHARD_DOCS):
            table = pa.table({"text": [text for _, text in docs[i:i + SHARD_DOCS]]})
            pq.write_table(table, tmp / f"shard_{i // SHARD_DOCS:05d}.parquet", compression="zstd")
        home.atomic_write_json(tmp / META, {
            "source": "python-stdlib-docstrings", "version": VERSION, "python": sys.version.split()[0],
            "documents": len(docs), "characters": sum(len(t) for _, t in docs),
            "modules": [m for m, _ in docs]})
    progress.log(f"stdlib corpus: {len(docs)} documents, {sum(len(t) for _, t in docs) / 1e6:.1f}M chars -> {out}")
    return out


def _version(meta: Path) -> int:
    try:
        return int(json.loads(meta.read_text(encoding="utf-8")).get("version", 1))
    except (OSError, ValueError, AttributeError):
        return 0


def collect_documents(timeout: float = 600.0) -> list[tuple[str, str]]:
    """(module, text) for every importable standard-library module, sorted by module name."""
    with _tmpfile() as result:
        # A fixed, minimal environment: nothing of the user's (tokens, paths) can reach the text, and the
        # corpus is the same on every machine with the same Python.
        env = {"PATH": os.defpath, "HOME": str(result.parent), "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
               "PYTHONWARNINGS": "ignore", "DISPLAY": "", "BROWSER": "true"}
        try:
            proc = subprocess.run([sys.executable, "-I", "-c", _CHILD, str(result), json.dumps(sorted(SKIP))],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  timeout=timeout, env=env, cwd=result.parent)
        except subprocess.TimeoutExpired:
            raise NanoforgeError(f"building the stdlib corpus took more than {timeout:.0f}s") from None
        if proc.returncode != 0 or not result.is_file():
            tail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise NanoforgeError(f"building the stdlib corpus failed: {tail[0]}")
        docs = json.loads(result.read_text(encoding="utf-8"))
    seen: set[str] = set()
    kept = []
    for module, text in docs:
        body = text.split("\n", 1)[-1]  # a C accelerator and its Python module (_decimal, decimal) share docs
        if len(text) >= MIN_CHARS and body not in seen:
            seen.add(body)
            kept.append((module, text))
    return kept


class _tmpfile:
    def __enter__(self) -> Path:
        import tempfile

        self.dir = tempfile.TemporaryDirectory(prefix="nanoforge-stdlib-")
        return Path(self.dir.name) / "docs.json"

    def __exit__(self, *exc: object) -> None:
        self.dir.cleanup()


# Runs in the child: walks sys.stdlib_module_names (and their submodules), imports each under a guard,
# writes [[module, text], ...] as JSON. Kept as source text so the child needs nothing from nanoforge.
_CHILD = r'''
import importlib, inspect, io, json, os, pkgutil, re, sys, sysconfig, warnings
warnings.simplefilter("ignore")
out, skip = sys.argv[1], set(json.loads(sys.argv[2]))
sys.stdout = io.StringIO(); sys.stderr = io.StringIO()
ADDR = re.compile(r" at 0x[0-9a-fA-F]+")

def clean(doc):
    doc = inspect.cleandoc(doc or "").strip()
    return ADDR.sub("", doc)

class Named:
    """A default value shown by name: `environ=os.environ`, not the environment's contents."""
    def __init__(self, name):
        self.name = name
    def __repr__(self):
        return self.name

LOCAL = {id(os.environ): "os.environ", id(sys.path): "sys.path", id(sys.argv): "sys.argv"}
LOCAL_STR = {v: k for k, v in [("sys.executable", sys.executable), ("sys.prefix", sys.prefix),
                               ("sys.exec_prefix", sys.exec_prefix), ("sys.base_prefix", sys.base_prefix),
                               ("os.getcwd()", os.getcwd()), ("os.path.expanduser('~')", os.path.expanduser("~"))]
                                + [(f"sysconfig.get_path({k!r})", v) for k, v in sysconfig.get_paths().items()]
             if v}

def machine_free(default):
    """None when the default is the same everywhere; else the name to show instead of its value."""
    if id(default) in LOCAL:
        return LOCAL[id(default)]
    if isinstance(default, str) and default in LOCAL_STR:
        return LOCAL_STR[default]
    return None

def signature(obj):
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return "(...)"
    params = []
    for p in sig.parameters.values():
        name = machine_free(p.default) if p.default is not p.empty else None
        params.append(p.replace(default=Named(name)) if name else p)
    try:
        sig = sig.replace(parameters=params)
    except (TypeError, ValueError):
        pass
    return ADDR.sub("", str(sig))

def describe(mod):
    name = mod.__name__
    parts = []
    doc = clean(inspect.getdoc(mod) if isinstance(mod.__doc__, str) else "")
    if doc:
        parts.append(f"Module {name}\n\n{doc}")
    try:
        members = sorted(vars(mod).items())
    except Exception:
        return "\n\n".join(parts)
    for attr, obj in members:
        if attr.startswith("_") or getattr(obj, "__module__", None) != name:
            continue
        if inspect.isclass(obj):
            cdoc = clean(obj.__doc__ if isinstance(obj.__doc__, str) else "")
            block = [f"class {attr}{signature(obj)}" + (f"\n{cdoc}" if cdoc else "")]
            for mname, meth in sorted(vars(obj).items()):
                if mname.startswith("_") and mname != "__init__":
                    continue
                if inspect.isfunction(meth) or inspect.ismethoddescriptor(meth) or isinstance(meth, (classmethod, staticmethod)):
                    fn = meth.__func__ if isinstance(meth, (classmethod, staticmethod)) else meth
                    mdoc = clean(fn.__doc__ if isinstance(getattr(fn, "__doc__", None), str) else "")
                    if mdoc:
                        block.append(f"{attr}.{mname}{signature(fn)}\n{mdoc}")
            if cdoc or len(block) > 1:
                parts.append("\n\n".join(block))
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            fdoc = clean(obj.__doc__ if isinstance(obj.__doc__, str) else "")
            if fdoc:
                parts.append(f"{attr}{signature(obj)}\n{fdoc}")
    return "\n\n".join(parts)

def skipped(name):
    top = name.split(".")[0]
    return top in skip or any(p in skip or p.startswith("test") or p == "__main__" for p in name.split(".")[1:]) \
        or "idle_test" in name or "turtle" in top

names = set()
for top in sorted(sys.stdlib_module_names):
    if skipped(top):
        continue
    try:
        mod = importlib.import_module(top)
    except BaseException:
        continue
    names.add(top)
    path = getattr(mod, "__path__", None)
    if path:
        for info in pkgutil.walk_packages(path, prefix=top + ".", onerror=lambda n: None):
            if not skipped(info.name):
                names.add(info.name)
docs = []
for name in sorted(names):
    try:
        mod = importlib.import_module(name)
        text = describe(mod)
    except BaseException:
        continue
    if text:
        docs.append([name, text])
sys.stdout = sys.__stdout__
with open(out, "w", encoding="utf-8") as f:
    json.dump(docs, f, ensure_ascii=False)
os._exit(0)
'''
