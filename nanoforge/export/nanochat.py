"""Import a nanochat checkpoint (karpathy/nanochat, first release to the end of 2025) as a nanoforge one.

    import_nanochat("~/.cache/nanochat/base_checkpoints/d20", "d20")   # -> checkpoints/base/d20
    import_nanochat("~/hf/nanochat-d32", "d32", phase="sft")            # a Hub download: all files in one folder

nanochat writes `model_<step>.pt` (a state dict, loaded with `torch.load(weights_only=True)`: no pickled
code runs), `meta_<step>.json` (its `model_config`) and, in `<base dir>/tokenizer/`, `tokenizer.pkl` (a
pickled tiktoken Encoding, read by a restricted unpickler) and `token_bytes.pt`. Its architecture is our
model with options (see nanoforge/model/llama.py): ReLU² MLP, parameter-free RMSNorm (also on the
embedding), QK-norm after the rotary, untied head, logits soft-capped at 15, eps = float32 eps.

nanochat's rotary turns by −θ where ours (and Hugging Face Llama's) turns by +θ. Negating the second half
of every q and k head (rows [hd/2, hd) of c_q and c_k) makes ours give the same attention scores: the
rotated halves come out negated on both sides, q·k is unchanged, and the per-head RMSNorm ignores signs.
`flip_rotary_rows` is that map (its own inverse); the NanoChatForCausalLM export applies it back.

The 2026 architecture (value embeddings, residual lambdas, smear gate, ...) is refused, naming its keys.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from nanoforge import home as home_mod
from nanoforge.errors import UserError

_FILE = re.compile(r"^model_(\d+)\.pt$")
_LAYER = {"attn.c_q.weight": "attention.wq.weight", "attn.c_k.weight": "attention.wk.weight",
          "attn.c_v.weight": "attention.wv.weight", "attn.c_proj.weight": "attention.wo.weight",
          "mlp.c_fc.weight": "feed_forward.w1.weight", "mlp.c_proj.weight": "feed_forward.w2.weight"}
_TOP = {"transformer.wte.weight": "tok_embeddings.weight", "lm_head.weight": "output.weight"}
# Parts of the 2026 architecture, named in the refusal.
NEWER_KEYS = ("resid_lambdas", "x0_lambdas", "value_embeds", "smear", "backout", "ve_gate")
CONFIG_KEYS = ("n_layer", "n_head", "n_kv_head", "n_embd", "vocab_size", "sequence_len")
NANOCHAT_EPS = float(torch.finfo(torch.float32).eps)  # F.rms_norm's default eps for fp32, what nanochat uses


def flip_rotary_rows(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """A copy of a q or k projection [heads·head_dim, (d)] with rows [hd/2, hd) of every head negated."""
    w = w.clone()
    view = w.view(-1, head_dim, *w.shape[1:])
    view[:, head_dim // 2:] *= -1
    return w


def find_checkpoint(path: str | os.PathLike, step: int | None = None) -> tuple[Path, int]:
    """(folder, step) of a nanochat checkpoint: a folder holding model_<step>.pt files (its latest step
    unless `step`) or one such file."""
    p = Path(path).expanduser()
    if p.is_file():
        m = _FILE.match(p.name)
        if not m:
            raise UserError(f"{p} is not a nanochat model file (expected model_<step>.pt)")
        return p.parent, int(m.group(1))
    if not p.is_dir():
        raise UserError(f"nanochat checkpoint {p} does not exist")
    steps = sorted(int(m.group(1)) for f in p.iterdir() if (m := _FILE.match(f.name)))
    if not steps:
        raise UserError(f"{p} holds no nanochat checkpoint (no model_<step>.pt)")
    if step is None:
        return p, steps[-1]
    if step not in steps:
        raise UserError(f"{p} has no step {step}; steps: {', '.join(map(str, steps))}")
    return p, step


def find_tokenizer(folder: Path) -> Path | None:
    """nanochat's tokenizer folder for a checkpoint folder: the folder itself (a Hub download), or
    `<base dir>/tokenizer` for `<base dir>/<phase>_checkpoints/<tag>/`."""
    for cand in (folder, folder / "tokenizer", folder.parent.parent / "tokenizer"):
        if (cand / "tokenizer.pkl").is_file():
            return cand
    return None


def _torch_load(path: Path, what: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except Exception as e:  # noqa: BLE001 - weights_only refuses anything but tensors and containers
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            first = "it needs full unpickling, which could run code; only plain tensor files are read"
        raise UserError(f"{path} is not a readable {what} ({first[:200]})") from None


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a nanochat model_<step>.pt (weights_only), `_orig_mod.` prefixes removed."""
    state = _torch_load(path, "nanochat model file")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a nanochat state dict (expected a dict of tensors)")
    return {k.removeprefix("_orig_mod."): v for k, v in state.items()}


def model_config(cfg: dict[str, Any], state: dict[str, torch.Tensor], where: str) -> Any:
    """Our ModelConfig for nanochat's `model_config` and the tensors (the padded vocab rows, the MLP width)."""
    from nanoforge.model import ModelConfig

    newer = sorted({k for k in state if any(n in k for n in NEWER_KEYS)})
    if newer:
        shown = ", ".join(newer[:4]) + (f" and {len(newer) - 4} more" if len(newer) > 4 else "")
        raise UserError(f"{where} is a checkpoint of nanochat's 2026 architecture (keys {shown}); only the "
                        f"2025 architecture (first release to December 2025) can be imported")
    missing = [k for k in CONFIG_KEYS if k not in cfg]
    if missing:
        raise UserError(f"{where}: model_config lacks {', '.join(missing)}")
    try:
        d, heads, kv = int(cfg["n_embd"]), int(cfg["n_head"]), int(cfg["n_kv_head"])
        vocab, layers = int(cfg["vocab_size"]), int(cfg["n_layer"])
        rows = state["transformer.wte.weight"].shape[0]
        ffn = state["transformer.h.0.mlp.c_fc.weight"].shape[0]
    except KeyError as e:
        raise UserError(f"{where} has no tensor {e.args[0]}: not a nanochat checkpoint") from None
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: model_config has an invalid value ({e})") from None
    if heads <= 0 or d % heads:
        raise UserError(f"{where}: n_embd {d} is not a multiple of n_head {heads}")
    if rows == vocab:
        pad = 0
    elif rows == -(-vocab // 64) * 64:
        pad = 64
    else:
        raise UserError(f"{where}: the embedding has {rows} rows but model_config.vocab_size is {vocab}")
    return ModelConfig(d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=kv, head_dim=d // heads,
                       ffn_dim=ffn, vocab_size=vocab, max_seq_len=int(cfg["sequence_len"]), rope_theta=10000.0,
                       norm_eps=NANOCHAT_EPS, tie_embeddings=False, pad_vocab_to=pad, mlp="relu2", qk_norm=True,
                       embed_norm=True, norm_weights=False, logit_softcap=15.0)


def convert_state(state: dict[str, torch.Tensor], mc: Any, where: str) -> dict[str, torch.Tensor]:
    """nanochat tensors -> ours (float32), q/k rows flipped for our rotary. Refuses unknown keys."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for k, v in state.items():
        m = re.match(r"transformer\.h\.(\d+)\.(.+)$", k)
        if k in _TOP:
            name = _TOP[k]
        elif m and m.group(2) in _LAYER:
            name = f"layers.{m.group(1)}.{_LAYER[m.group(2)]}"
        else:
            unknown.append(k)
            continue
        v = v.to(torch.float32)
        if name.endswith(("wq.weight", "wk.weight")):
            v = flip_rotary_rows(v, mc.head_dim)
        out[name] = v
    if unknown:
        raise UserError(f"{where} has tensors the 2025 nanochat architecture does not: {', '.join(unknown[:4])}")
    return out


def import_nanochat(path: str | os.PathLike, tag: str, *, phase: str = "base", step: int | None = None,
                    force: bool = False) -> Path:
    """A nanochat checkpoint -> checkpoints/<phase>/<tag> (its step kept) with its tokenizer imported as
    tokenizers/<tag> (reused when the same one is there already). Returns the checkpoint folder.
    Refuses: files that need full unpickling, a meta without model_config, the 2026 architecture, a
    tokenizer whose size differs from the model's vocabulary or whose token_bytes.pt disagrees."""
    from nanoforge.checkpoint import PHASES

    if phase not in PHASES:
        raise UserError(f"--phase must be one of {', '.join(PHASES)}, got {phase!r}")
    home_mod.check_name(tag, "--tag")
    dest = home_mod.checkpoint_dir(phase, tag)
    with home_mod.lock(dest, "checkpoint"), home_mod.lock(home_mod.tokenizer_dir(tag), "tokenizer"):
        return _import_locked(path, tag, phase, step, force, dest)


def _import_locked(path: str | os.PathLike, tag: str, phase: str, step: int | None, force: bool,
                   dest: Path) -> Path:
    from nanoforge.checkpoint import load_weights, save_checkpoint
    from nanoforge.model import LLaMA
    from nanoforge.tokenizer import Tokenizer
    from nanoforge.tokenizer.formats import _save, nanochat_tokenizer

    folder, step = find_checkpoint(path, step)
    model_file = folder / f"model_{step:06d}.pt"
    if not model_file.is_file():  # nanochat pads steps to 6 digits; accept other paddings too
        model_file = next(f for f in folder.iterdir() if (m := _FILE.match(f.name)) and int(m.group(1)) == step)
    meta_file = model_file.with_name(f"meta_{model_file.stem.split('_', 1)[1]}.json")
    nc_meta = home_mod.read_json(meta_file, "nanochat meta")
    if not isinstance(nc_meta, dict) or not isinstance(nc_meta.get("model_config"), dict):
        raise UserError(f"{meta_file} has no model_config: not a nanochat checkpoint meta")
    if dest.exists() and not force:
        raise UserError(f"checkpoint {dest} already exists (use --force to replace it)")
    state = read_state(model_file)
    mc = model_config(nc_meta["model_config"], state, str(model_file))
    ours = convert_state(state, mc, str(model_file))

    tok_dir = find_tokenizer(folder)
    if tok_dir is None:
        raise UserError(f"no tokenizer.pkl next to {folder} or in its base dir's tokenizer/ folder: "
                        f"a nanochat checkpoint needs its tokenizer")
    tok = nanochat_tokenizer(tok_dir / "tokenizer.pkl", name=tag)
    if tok.vocab_size != mc.vocab_size:
        raise UserError(f"{tok_dir / 'tokenizer.pkl'} has {tok.vocab_size} tokens but the checkpoint's "
                        f"vocabulary is {mc.vocab_size}: the tokenizer belongs to another model")
    if (tok_dir / "token_bytes.pt").is_file():
        tb = _torch_load(tok_dir / "token_bytes.pt", "token_bytes file")
        if not isinstance(tb, torch.Tensor) or tb.numel() != tok.vocab_size \
                or not torch.equal(tb.to(torch.int64).cpu(), torch.from_numpy(tok.token_bytes).to(torch.int64)):
            raise UserError(f"{tok_dir / 'token_bytes.pt'} disagrees with tokenizer.pkl (byte length per id)")
    model = LLaMA(mc)
    load_weights(model, ours, where=str(model_file))

    known = home_mod.tokenizer_dir(tag)
    try:
        reuse = Tokenizer.load(known) if known.is_dir() else None
    except UserError:
        reuse = None
    if reuse is not None and reuse.fingerprint == tok.fingerprint:
        tok = reuse
    else:
        tok = Tokenizer.load(_save(tok, known, force))
    meta = {"phase": phase, "tag": tag, "model_config": mc.to_dict(), "config": None,
            "tokenizer": {"path": str(tok.path), "name": tok.name, "fingerprint": tok.fingerprint},
            "tokens": None, "val_bpb": None, "imported_from": str(model_file.resolve()),
            "imported_config": {"format": "nanochat", "model_config": nc_meta["model_config"],
                                **{k: nc_meta[k] for k in ("step", "val_bpb") if k in nc_meta}}}
    with home_mod.atomic_dir(dest, force=force, what="checkpoint") as tmp:
        save_checkpoint(tmp, step, model, None, meta)
    return dest
