"""Checkpoints: `checkpoints/<phase>/<tag>/{model_<step>.safetensors, optim_<step>.pt, meta_<step>.json}`.

Each file is written to a temporary name and renamed; the meta JSON goes last and records the other
files' sizes, so a step is complete exactly when its meta exists and the sizes match. Anything else is a
torn write, reported as one UserError line that names the files. The optimizer file is loaded with
`torch.load(weights_only=True)`: no pickled code runs.

    save_checkpoint(folder, step, model, optimizer, meta)
    model, meta = load_model("checkpoints/base/demo")       # the latest step of a tag
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nanoforge import home as home_mod
from nanoforge.errors import UserError

_STEP = re.compile(r"^(model|optim|meta)_(\d+)\.(safetensors|pt|json)$")
PHASES = ("base", "mid", "sft", "rl")


def save_checkpoint(folder: str | os.PathLike, step: int, model: nn.Module | dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer | dict[str, Any] | None, meta: dict[str, Any]) -> Path:
    """Write model (safetensors), optimizer state (torch) and meta (JSON) for `step`; returns the model path.
    `model` and `optimizer` may be modules/optimizers or already-gathered state dicts."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if isinstance(model, nn.Module) else model
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    model_path = folder / f"model_{step:06d}.safetensors"
    with home_mod.atomic_path(model_path) as tmp:
        save_file(tensors, str(tmp), metadata={"step": str(step)})
    files = {"model": {"name": model_path.name, "bytes": model_path.stat().st_size}}
    if optimizer is not None:
        optim_state = optimizer.state_dict() if isinstance(optimizer, torch.optim.Optimizer) else optimizer
        optim_path = folder / f"optim_{step:06d}.pt"
        with home_mod.atomic_path(optim_path) as tmp:
            torch.save(optim_state, tmp)
        files["optim"] = {"name": optim_path.name, "bytes": optim_path.stat().st_size}
    home_mod.atomic_write_json(folder / f"meta_{step:06d}.json", {**meta, "step": step, "files": files})
    return model_path


def checkpoint_steps(folder: str | os.PathLike) -> list[int]:
    """Steps with a meta file (complete or torn), ascending."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    steps = set()
    for p in folder.iterdir():
        m = _STEP.match(p.name)
        if m and m.group(1) in ("model", "meta"):
            steps.add(int(m.group(2)))
    return sorted(steps)


def check_complete(folder: Path, step: int) -> dict[str, Any]:
    """The meta of a complete step; UserError naming the problem for a torn or missing one."""
    meta_path = folder / f"meta_{step:06d}.json"
    fix = f"delete the files of step {step} in {folder} to fall back to an earlier step"
    if not meta_path.exists():
        raise UserError(f"checkpoint {folder} step {step} is incomplete (torn write: no {meta_path.name}); {fix}")
    meta = home_mod.read_json(meta_path, "checkpoint meta")
    for kind, info in meta.get("files", {}).items():
        path = folder / info["name"]
        size = path.stat().st_size if path.exists() else -1
        if size != info["bytes"]:
            state = "missing" if size < 0 else f"{size} bytes, expected {info['bytes']}"
            raise UserError(f"checkpoint {folder} step {step} is torn: {kind} file {path.name} is {state}; {fix}")
    return meta


def resolve_checkpoint(path: str | os.PathLike, step: int | None = None) -> tuple[Path, int]:
    """(tag folder, step) for a tag folder (its latest step unless `step`), a model_<step>.safetensors or
    meta_<step>.json path, or a bare tag name looked up under checkpoints/<phase>/. UserError if none."""
    p = Path(path).expanduser()
    if p.is_file() or (not p.exists() and _STEP.match(p.name)):
        m = _STEP.match(p.name)
        if not m:
            raise UserError(f"{p} is not a checkpoint file (expected model_<step>.safetensors)")
        if not p.exists():
            raise UserError(f"checkpoint file {p} does not exist")
        return p.parent, int(m.group(2))
    if not p.exists() and os.sep not in str(path):
        candidates = [home_mod.home() / "checkpoints" / ph / str(path) for ph in PHASES]
        if "/" in str(path):
            candidates.insert(0, home_mod.home() / "checkpoints" / str(path))
        found = [c for c in candidates if c.is_dir()]
        if found:
            p = found[0]
    if not p.is_dir():
        raise UserError(f"checkpoint {path} does not exist (give a tag folder, a model_<step>.safetensors "
                        f"file or a tag name; `nanoforge checkpoints list` shows them)")
    steps = checkpoint_steps(p)
    if not steps:
        raise UserError(f"checkpoint folder {p} holds no checkpoints")
    if step is None:
        return p, steps[-1]
    if step not in steps:
        raise UserError(f"checkpoint folder {p} has no step {step}; steps: {', '.join(map(str, steps))}")
    return p, step


def load_meta(checkpoint: str | os.PathLike, step: int | None = None) -> tuple[Path, int, dict[str, Any]]:
    folder, step = resolve_checkpoint(checkpoint, step)
    return folder, step, check_complete(folder, step)


def load_state_dict(folder: Path, step: int, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / f"model_{step:06d}.safetensors"
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise UserError(f"checkpoint file {path} cannot be read ({e}); it may be torn") from None


def load_model(checkpoint: str | os.PathLike, device: str | torch.device = "cpu", step: int | None = None
               ) -> tuple[nn.Module, dict[str, Any]]:
    """(LLaMA in eval mode on `device`, meta dict) from a tag folder (latest step) or a model file."""
    from nanoforge.dist import parse_device
    from nanoforge.model import LLaMA, ModelConfig

    device = parse_device(device)
    folder, step, meta = load_meta(checkpoint, step)
    model = LLaMA(ModelConfig.from_dict(meta["model_config"]))
    load_weights(model, load_state_dict(folder, step), where=f"{folder} step {step}")
    model.to(device).eval()
    return model, meta


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Copy `state` into `model`; a missing/extra tensor or a changed shape is a UserError."""
    own = model.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise UserError(f"checkpoint {where} does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise UserError(f"checkpoint {where} does not match the model shape: {k} is {tuple(v.shape)} in the "
                            f"checkpoint, {tuple(own[k].shape)} in the model (did model.* settings change?)")
    model.load_state_dict(state)


def load_optimizer_state(folder: Path, step: int) -> dict[str, Any]:
    path = folder / f"optim_{step:06d}.pt"
    if not path.exists():
        raise UserError(f"checkpoint {folder} step {step} has no optimizer state ({path.name}); cannot resume")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a broken file
        raise UserError(f"optimizer state {path} cannot be read ({type(e).__name__}); it may be torn") from None


def prune_checkpoints(folder: str | os.PathLike, keep_last: int, keep_best: bool = True) -> list[int]:
    """Delete all but the last `keep_last` steps and (if keep_best) the step with the lowest val_bpb.
    Returns the deleted steps. Torn steps older than the kept ones go too."""
    folder = Path(folder)
    steps = checkpoint_steps(folder)
    keep = set(steps[-keep_last:]) if keep_last > 0 else set()
    if keep_best:
        scored = []
        for s in steps:
            try:
                bpb = home_mod.read_json(folder / f"meta_{s:06d}.json").get("val_bpb")
            except UserError:
                continue
            if bpb is not None:
                scored.append((bpb, s))
        if scored:
            keep.add(min(scored)[1])
    deleted = [s for s in steps if s not in keep]
    for s in deleted:
        for name in (f"meta_{s:06d}.json", f"model_{s:06d}.safetensors", f"optim_{s:06d}.pt"):
            (folder / name).unlink(missing_ok=True)  # meta first: a half-deleted step reads as torn
    return deleted


def list_checkpoints(root: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """One row per tag: phase, tag, steps, latest step, its val_bpb and tokens, path, complete."""
    root = Path(root) if root else home_mod.home() / "checkpoints"
    rows = []
    for phase_dir in sorted(p for p in root.glob("*") if p.is_dir()):
        for tag_dir in sorted(p for p in phase_dir.glob("*") if p.is_dir() and not p.name.startswith(".")):
            steps = checkpoint_steps(tag_dir)
            if not steps:
                continue
            row: dict[str, Any] = {"phase": phase_dir.name, "tag": tag_dir.name, "steps": steps, "step": steps[-1],
                                   "val_bpb": None, "tokens": None, "path": str(tag_dir), "complete": True}
            try:
                meta = check_complete(tag_dir, steps[-1])
                row["val_bpb"], row["tokens"] = meta.get("val_bpb"), meta.get("tokens")
            except UserError:
                row["complete"] = False
            rows.append(row)
    return rows
