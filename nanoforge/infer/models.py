"""The models a server offers: found on disk (checkpoints and Hugging Face exports), described without
loading their weights, loaded on first use, and kept loaded up to a bound (the least recently used idle
model is unloaded to make room).

    pool = ModelPool(discover([]))              # every checkpoint and export under $NANOFORGE_HOME
    loaded = pool.acquire("sft/demo", wait=30)  # ModelLoading if it is not ready within `wait` seconds
    loaded.worker.submit(ids, params, on_event)
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nanoforge import home as home_mod
from nanoforge import progress
from nanoforge.errors import UserError
from nanoforge.infer.scheduler import ModelWorker


class UnknownModel(LookupError):
    pass


class ModelLoading(Exception):
    """The model is not ready yet (still loading, or no room while every loaded model is busy)."""


@dataclass
class ServedModel:
    """A model on disk: `kind` is "checkpoint" or "export"; `info` is what /v1/models shows."""
    id: str
    path: Path
    kind: str
    info: dict[str, Any] = field(default_factory=dict)
    created: int = 0


@dataclass
class LoadedModel:
    served: ServedModel
    model: torch.nn.Module
    tokenizer: Any
    worker: ModelWorker
    context: int
    last_used: float = 0.0


def _describe_checkpoint(path: Path) -> tuple[dict[str, Any], int]:
    from nanoforge.checkpoint import load_meta
    from nanoforge.model import ModelConfig

    folder, step, meta = load_meta(path)
    mc = ModelConfig.from_dict(meta["model_config"])
    tok = meta.get("tokenizer") or {}
    created = int((folder / f"meta_{step:06d}.json").stat().st_mtime)
    return {"phase": meta.get("phase") or folder.parent.name, "step": step, "parameters": mc.num_params(),
            "val_bpb": meta.get("val_bpb"), "tokenizer": tok.get("name"), "context": mc.max_seq_len,
            "path": str(folder)}, created


def _describe_export(path: Path) -> tuple[dict[str, Any], int]:
    from nanoforge.export.hf import _config_from_hf

    cfg = home_mod.read_json(path / "config.json", "Hugging Face config")
    ours = home_mod.read_json(path / "nanoforge.json", "export info") if (path / "nanoforge.json").is_file() else {}
    mc = _config_from_hf(cfg)
    return {"phase": "export", "step": ours.get("step"), "parameters": mc.num_params(), "val_bpb": None,
            "tokenizer": (ours.get("tokenizer") or {}).get("name"), "context": mc.max_seq_len,
            "path": str(path)}, int((path / "config.json").stat().st_mtime)


def discover(paths: Sequence[str | os.PathLike] = ()) -> list[ServedModel]:
    """The models to serve: the given checkpoint folders / tag names / export folders, or (none given) every
    complete checkpoint under $NANOFORGE_HOME/checkpoints (ids "<phase>/<tag>") and every export under
    exports/ (ids "export/<tag>"). UserError for a path that is neither."""
    from nanoforge.checkpoint import list_checkpoints, resolve_checkpoint

    found: list[ServedModel] = []
    if not paths:  # everything under the home; what cannot be described is skipped with a warning
        candidates = [(f"{r['phase']}/{r['tag']}", Path(r["path"]), "checkpoint") for r in list_checkpoints()
                      if r["complete"]]
        exports = home_mod.home() / "exports"
        candidates += [(f"export/{p.parent.name}", p.parent, "export")
                       for p in (sorted(exports.glob("*/config.json")) if exports.is_dir() else [])
                       if not p.parent.name.startswith(".")]  # not an export being written
        for mid, path, kind in candidates:
            try:
                info, created = (_describe_checkpoint if kind == "checkpoint" else _describe_export)(path)
            except (UserError, KeyError, TypeError, ValueError) as e:
                progress.warn(f"serve: skipping {path}: {e}")
                continue
            found.append(ServedModel(mid, path, kind, info, created))
        return found
    seen: set[str] = set()
    for raw in paths:
        p = Path(raw).expanduser()
        if (p / "config.json").is_file() and not list(p.glob("model_*.safetensors")):
            info, created = _describe_export(p)
            kind = "export"
            mid = f"export/{p.name}"
        else:
            folder, _ = resolve_checkpoint(raw)
            p = folder
            info, created = _describe_checkpoint(folder)
            kind = "checkpoint"
            mid = f"{info['phase']}/{folder.name}"
        base, k = mid, 2
        while mid in seen:
            mid, k = f"{base}-{k}", k + 1
        seen.add(mid)
        found.append(ServedModel(mid, p, kind, info, created))
    return found


def load_export(folder: Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) from a Hugging Face Llama, Qwen2 or NanoChat export, in memory: the tokenizer it was exported from
    when $NANOFORGE_HOME still has it (same fingerprint), else its tokenizer.json."""
    from nanoforge.checkpoint import load_weights
    from nanoforge.export.hf import read_hf_model
    from nanoforge.model import LLaMA
    from nanoforge.tokenizer import Tokenizer
    from nanoforge.tokenizer.core import BOS

    mc, state = read_hf_model(folder)
    model = LLaMA(mc)
    load_weights(model, state, where=str(folder))
    model.to(device).eval()
    ours = home_mod.read_json(folder / "nanoforge.json", "export info") if (folder / "nanoforge.json").is_file() else {}
    info = ours.get("tokenizer") or {}
    tok = None
    if info.get("name"):
        try:
            tok = Tokenizer.load(info["name"])
            if tok.fingerprint != info.get("fingerprint"):
                tok = None
        except UserError:
            tok = None
    if tok is None:
        hf_file = folder / "tokenizer.json"
        if not hf_file.is_file():
            raise UserError(f"export {folder} has no tokenizer.json")
        hf_json = hf_file.read_text(encoding="utf-8")
        tok = Tokenizer.from_hf_json(hf_json, name=folder.name, bos=BOS if BOS in hf_json else None)
    return model, tok


def default_engine(model: torch.nn.Module, tokenizer: Any, max_batch: int) -> Any:
    from nanoforge.infer.engine import Engine

    return Engine(model, tokenizer, max_batch=max_batch)


def auto_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class ModelPool:
    """Served models by id, loading each on first use in a background thread; at most `max_loaded` stay
    loaded. `loader(served) -> (model, tokenizer)` and `engine_factory(model, tokenizer, max_batch)` can be
    replaced (tests)."""

    def __init__(self, models: Sequence[ServedModel], *, max_loaded: int = 2, device: str = "auto",
                 max_batch: int = 8, max_queue: int = 64,
                 loader: Callable[[ServedModel], tuple[torch.nn.Module, Any]] | None = None,
                 engine_factory: Callable[[torch.nn.Module, Any, int], Any] | None = None) -> None:
        self.models = {m.id: m for m in models}
        self.max_loaded = max_loaded
        self.device = auto_device(device)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.loader = loader or self._load
        self.engine_factory = engine_factory or default_engine
        self._lock = threading.Lock()
        self._loaded: dict[str, LoadedModel] = {}
        self._loading: dict[str, threading.Event] = {}
        self._errors: dict[str, str] = {}
        self._tokenizers: dict[str, Any] = {}

    def _load(self, served: ServedModel) -> tuple[torch.nn.Module, Any]:
        from nanoforge.infer.engine import load_checkpoint

        if served.kind == "export":
            return load_export(served.path, self.device)
        model, tok, _ = load_checkpoint(served.path, device=self.device)
        return model, tok

    def get(self, model_id: str) -> ServedModel:
        try:
            return self.models[model_id]
        except KeyError:
            raise UnknownModel(model_id) from None

    def is_loaded(self, model_id: str) -> bool:
        return model_id in self._loaded

    def loading(self) -> list[str]:
        return sorted(self._loading)

    def acquire(self, model_id: str, wait: float = 60.0) -> LoadedModel:
        """The loaded model, loading it first if needed (waits up to `wait` seconds, else ModelLoading).
        A model that failed to load raises UserError with the reason (and is tried again next time)."""
        served = self.get(model_id)
        with self._lock:
            lm = self._loaded.get(model_id)
            if lm is not None:
                lm.last_used = time.monotonic()
                return lm
            event = self._loading.get(model_id)
            if event is None:
                if len(self._loaded) >= self.max_loaded and not self._evict_one():
                    raise ModelLoading(f"{len(self._loaded)} models are loaded and busy (the server keeps at "
                                       f"most {self.max_loaded}); try again shortly")
                event = self._loading[model_id] = threading.Event()
                self._errors.pop(model_id, None)
                threading.Thread(target=self._load_in_background, args=(served, event), daemon=True).start()
        if not event.wait(wait):
            raise ModelLoading(f"model {model_id} is loading; try again shortly")
        with self._lock:
            if model_id in self._errors:
                raise UserError(self._errors.pop(model_id))
            lm = self._loaded[model_id]
            lm.last_used = time.monotonic()
            return lm

    def _load_in_background(self, served: ServedModel, event: threading.Event) -> None:
        t0 = time.perf_counter()
        try:
            model, tok = self.loader(served)
            engine = self.engine_factory(model, tok, self.max_batch)
            worker = ModelWorker(engine, max_batch=self.max_batch, max_queue=self.max_queue, name=served.id)
            lm = LoadedModel(served, model, tok, worker, int(model.config.max_seq_len), time.monotonic())
            with self._lock:
                self._loaded[served.id] = lm
                self._tokenizers.setdefault(served.id, tok)
            progress.log(f"serve: loaded {served.id} in {time.perf_counter() - t0:.1f}s")
        except Exception as e:  # reported to the waiting request; the server keeps running
            with self._lock:
                self._errors[served.id] = f"model {served.id} failed to load: {e}"
        finally:
            with self._lock:
                self._loading.pop(served.id, None)
            event.set()

    def _evict_one(self) -> bool:
        idle = [lm for lm in self._loaded.values() if not lm.worker.busy()]
        if not idle:
            return False
        victim = min(idle, key=lambda lm: lm.last_used)
        del self._loaded[victim.served.id]
        victim.worker.stop()
        progress.log(f"serve: unloaded {victim.served.id}")
        return True

    def status(self) -> dict[str, dict[str, Any]]:
        """Per model: loaded, loading, and (when loaded) active / waiting requests and slots."""
        with self._lock:
            loaded, loading = dict(self._loaded), set(self._loading)
        return {mid: {"loaded": mid in loaded, "loading": mid in loading,
                      **(loaded[mid].worker.load() if mid in loaded else {})} for mid in self.models}

    def tokenizer(self, model_id: str) -> Any:
        """The model's tokenizer, without loading the model's weights."""
        from nanoforge.tokenizer import Tokenizer

        served = self.get(model_id)
        with self._lock:
            if model_id in self._tokenizers:
                return self._tokenizers[model_id]
        if served.kind == "export":
            tok = self.acquire(model_id).tokenizer
        else:
            from nanoforge.checkpoint import load_meta

            _, _, meta = load_meta(served.path)
            info = meta.get("tokenizer") or {}
            tok = None
            for c in (info.get("path"), info.get("name")):
                if c:
                    try:
                        tok = Tokenizer.load(c)
                        break
                    except UserError:
                        continue
            if tok is None:
                raise UserError(f"cannot find the tokenizer of {model_id}")
        with self._lock:
            self._tokenizers[model_id] = tok
        return tok

    def close(self) -> None:
        with self._lock:
            loaded, self._loaded = list(self._loaded.values()), {}
        for lm in loaded:
            lm.worker.stop()
