"""Export a checkpoint as a Hugging Face model folder, and import one back.

    export_hf("checkpoints/base/demo", "exports/demo")        # config.json, model.safetensors, tokenizer, ...
    import_hf("exports/demo", "demo2")                        # -> checkpoints/base/demo2

The class follows the model's options (`hf_architecture`): the plain model is `LlamaForCausalLM`,
`qkv_bias` makes it `Qwen2ForCausalLM`, the nanochat options (relu2, qk_norm, embed_norm, no norm weights,
soft-capped logits) `NanoChatForCausalLM` (transformers >= 5). Our parameter names map one-to-one onto
theirs (see `hf_name`); RoPE uses Llama's rotate-half layout, so no weight is permuted, except for
nanochat, whose rotary turns the other way (see nanoforge/export/nanochat.py). config.json writes every
field explicitly (transformers' defaults have changed between versions) and the rope settings in both the
4.x (`rope_theta`, `rope_scaling`) and the 5.x (`rope_parameters`) forms.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from nanoforge import home as home_mod
from nanoforge import progress
from nanoforge.errors import UserError

_LAYER = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_LAYERS = {
    "llama": _LAYER,
    "qwen2": {**_LAYER, "attention.wq.bias": "self_attn.q_proj.bias", "attention.wk.bias": "self_attn.k_proj.bias",
              "attention.wv.bias": "self_attn.v_proj.bias"},
    "nanochat": {k: v for k, v in _LAYER.items() if "norm" not in k and "w3" not in k}
    | {"feed_forward.w1.weight": "mlp.fc1.weight", "feed_forward.w2.weight": "mlp.fc2.weight"},
}
CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "nanochat": "NanoChatForCausalLM"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_architecture(mc: Any) -> str:
    """"llama", "qwen2" or "nanochat": the transformers model type that computes what `mc` computes.
    UserError naming the options no class combines."""
    nanochat = mc.mlp == "relu2" and mc.qk_norm and mc.embed_norm and not mc.norm_weights and not mc.qkv_bias
    if nanochat and mc.head_dim * mc.n_heads == mc.d_model and not mc.tie_embeddings:
        return "nanochat"
    plain = mc.mlp == "swiglu" and not mc.qk_norm and not mc.embed_norm and mc.norm_weights and not mc.logit_softcap
    if plain:
        return "qwen2" if mc.qkv_bias else "llama"
    opts = {k: getattr(mc, k) for k in ("mlp", "qk_norm", "embed_norm", "norm_weights", "logit_softcap",
                                         "qkv_bias", "tie_embeddings")}
    raise UserError(f"no Hugging Face class computes this model ({', '.join(f'{k}={v}' for k, v in opts.items())}): "
                    f"Llama and Qwen2 need swiglu with norm weights and no qk/embed norm or softcap; "
                    f"NanoChat needs relu2, qk_norm, embed_norm, no norm weights, no biases, untied head, "
                    f"head_dim·n_heads = d_model")


def hf_name(name: str, arch: str = "llama") -> str:
    """transformers' name of one of our parameters in model type `arch`."""
    if name in _TOP:
        return _TOP[name]
    m = re.match(r"layers\.(\d+)\.(.+)$", name)
    if not m or m.group(2) not in _LAYERS[arch]:
        raise UserError(f"parameter {name} has no {CLASSES[arch]} counterpart: this model variant cannot be exported")
    return f"model.layers.{m.group(1)}.{_LAYERS[arch][m.group(2)]}"


def our_name(name: str, arch: str = "llama") -> str:
    """Our name of a transformers parameter of model type `arch` (inverse of `hf_name`)."""
    inv_top = {v: k for k, v in _TOP.items()}
    if name in inv_top:
        return inv_top[name]
    m = re.match(r"model\.layers\.(\d+)\.(.+)$", name)
    inv = {v: k for k, v in _LAYERS[arch].items()}
    if not m or m.group(2) not in inv:
        raise UserError(f"tensor {name} is not part of a {CLASSES[arch]} nanoforge can represent "
                        f"(unsupported architecture feature)")
    return f"layers.{m.group(1)}.{inv[m.group(2)]}"


def hf_config(mc: Any, *, bos_id: int | None, eos_id: int | None, dtype: str) -> dict[str, Any]:
    """config.json for `mc` (a ModelConfig) in the class `hf_architecture` picks, every field explicit."""
    import transformers

    arch = hf_architecture(mc)
    common = {
        "architectures": [CLASSES[arch]], "model_type": arch,
        "vocab_size": mc.vocab_size, "hidden_size": mc.d_model, "intermediate_size": mc.ffn_dim,
        "num_hidden_layers": mc.n_layers, "num_attention_heads": mc.n_heads,
        "num_key_value_heads": mc.n_kv_heads, "max_position_embeddings": mc.max_seq_len,
        "rms_norm_eps": mc.norm_eps, "rope_theta": mc.rope_theta, "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": mc.rope_theta}, "attention_dropout": 0.0,
        "tie_word_embeddings": bool(mc.tie_embeddings), "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": eos_id,
        "torch_dtype": dtype, "dtype": dtype, "transformers_version": transformers.__version__,
    }
    if arch == "llama":
        return llama_config(mc, bos_id=bos_id, eos_id=eos_id, dtype=dtype)
    if arch == "qwen2":  # q/k/v biases are always on in Qwen2; every layer full attention
        return {**common, "head_dim": mc.head_dim, "hidden_act": "silu", "use_sliding_window": False,
                "sliding_window": None, "max_window_layers": mc.n_layers,
                "layer_types": ["full_attention"] * mc.n_layers}
    return {**common, "hidden_act": "relu2", "attention_bias": False,
            "final_logit_softcapping": mc.logit_softcap or None}


def llama_config(mc: Any, *, bos_id: int | None, eos_id: int | None, dtype: str) -> dict[str, Any]:
    """config.json of a LlamaForCausalLM for `mc` (a ModelConfig), every field explicit."""
    import transformers

    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": mc.vocab_size, "hidden_size": mc.d_model, "intermediate_size": mc.ffn_dim,
        "num_hidden_layers": mc.n_layers, "num_attention_heads": mc.n_heads,
        "num_key_value_heads": mc.n_kv_heads, "head_dim": mc.head_dim,
        "max_position_embeddings": mc.max_seq_len, "rms_norm_eps": mc.norm_eps,
        "rope_theta": mc.rope_theta, "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": mc.rope_theta},
        "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "tie_word_embeddings": bool(mc.tie_embeddings), "initializer_range": 0.02, "pretraining_tp": 1,
        "use_cache": True, "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": eos_id,
        "torch_dtype": dtype, "dtype": dtype, "transformers_version": transformers.__version__,
    }


CHAT_PHASES = ("mid", "sft", "rl")


def is_chat_checkpoint(folder: Path, meta: dict[str, Any]) -> bool:
    """A mid/sft/rl checkpoint (its meta's phase, else the phase folder it lives in)."""
    return (meta.get("phase") or folder.parent.name) in CHAT_PHASES


def export_hf(checkpoint: str | os.PathLike, out: str | os.PathLike | None = None, *, dtype: str = "float32",
              force: bool = False, tokenizer: Any = None, chat_template: bool | None = None) -> Path:
    """Write a Hugging Face model folder (Llama, Qwen2 or NanoChat: `hf_architecture`) for `checkpoint` into
    `out` (None: $NANOFORGE_HOME/exports/<tag>), atomically: config.json, generation_config.json,
    model.safetensors, tokenizer files, nanoforge.json. Returns the folder. Refuses an existing `out`
    unless `force`, and a model no class represents. Vocabulary padding rows (`pad_vocab_to`) are
    dropped: they are never scored, the exported model has vocab_size rows.
    `chat_template` (None: for chat checkpoints, see `is_chat_checkpoint`) writes the Jinja chat template
    (tokenizer/hf.py says what that changes) and makes `<|assistant_end|>` end generation too."""
    from safetensors.torch import save_file

    from nanoforge.checkpoint import resolve_checkpoint
    from nanoforge.infer.engine import load_checkpoint
    from nanoforge.tokenizer.hf import export_hf as export_tokenizer

    if dtype not in _DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    folder, _ = resolve_checkpoint(checkpoint)
    out = Path(out) if out is not None else home_mod.export_dir(folder.name)
    if out.exists() and not force:
        raise UserError(f"export folder {out} already exists (use --force to replace it)")
    model, tok, meta = load_checkpoint(checkpoint, tokenizer=tokenizer)
    mc = model.config
    if tok.vocab_size > mc.vocab_size:
        raise UserError(f"tokenizer {tok.name} has {tok.vocab_size} ids but the model only {mc.vocab_size}: "
                        f"the export would have tokens without embeddings")
    arch = hf_architecture(mc)
    tensors = hf_state_dict(model, arch, _DTYPES[dtype])
    config = hf_config(mc, bos_id=tok.bos_id, eos_id=tok.eos_id, dtype=dtype)
    # No max_length: transformers warns on every generate(max_new_tokens=...) when both are set.
    chat = is_chat_checkpoint(folder, meta) if chat_template is None else chat_template
    generation = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.eos_id,
                  "do_sample": False}
    if chat:
        generation["eos_token_id"] = [tok.special_id("<|assistant_end|>"), tok.eos_id]
    with home_mod.atomic_dir(out, force=force, what="export folder") as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        home_mod.atomic_write_json(tmp / "config.json", config)
        home_mod.atomic_write_json(tmp / "generation_config.json", generation)
        export_tokenizer(tok, tmp, chat=chat)
        home_mod.atomic_write_json(tmp / "nanoforge.json", {
            "source": str(folder.resolve()), "step": meta.get("step"), "model_config": mc.to_dict(),
            "tokenizer": {"name": tok.name, "fingerprint": tok.fingerprint}, "dtype": dtype,
            "chat_template": chat})
    return out


def hf_state_dict(model: Any, arch: str, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """`model`'s tensors under transformers' names for model type `arch` (padding rows dropped)."""
    from nanoforge.export.nanochat import flip_rotary_rows

    mc = model.config
    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name.startswith("rope_"):
            continue
        if name in ("tok_embeddings.weight", "output.weight"):
            t = t[:mc.vocab_size]  # padded rows are never scored: the export has exactly vocab_size rows
        if arch == "nanochat" and name.endswith(("wq.weight", "wk.weight")):
            t = flip_rotary_rows(t, mc.head_dim)
        tensors[hf_name(name, arch)] = t.detach().to(dtype).contiguous().clone()
    return tensors


def _check_supported(cfg: dict[str, Any], where: Path) -> str:
    """The model type of a config we can import ("llama", "qwen2", "nanochat"); UserError otherwise."""
    archs = cfg.get("architectures") or []
    arch = cfg.get("model_type")
    if arch not in CLASSES or (archs and archs != [CLASSES[arch]]):
        raise UserError(f"{where}: model_type {arch!r} / architectures {archs} cannot be imported; nanoforge "
                        f"reads {', '.join(f'{t} ({c})' for t, c in CLASSES.items())}")
    problems = []
    act = {"llama": "silu", "qwen2": "silu", "nanochat": "relu2"}[arch]
    if cfg.get("hidden_act", act) != act:
        problems.append(f"hidden_act={cfg['hidden_act']}")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            problems.append(f"{flag}=true")
    if arch == "qwen2" and (cfg.get("use_sliding_window") or any(
            t != "full_attention" for t in cfg.get("layer_types") or [])):
        problems.append("sliding-window attention")
    rope = cfg.get("rope_scaling") or {}
    params = cfg.get("rope_parameters") or {}
    for r in (rope, params):
        kind = r.get("rope_type", r.get("type", "default"))
        if kind != "default" and f"rope_type={kind}" not in problems:
            problems.append(f"rope_type={kind}")
    if problems:
        raise UserError(f"{where}: unsupported {CLASSES[arch]} features {', '.join(problems)} (nanoforge's model "
                        f"has {act}, no biases beyond Qwen2's q/k/v and plain RoPE)")
    return arch


def _config_from_hf(cfg: dict[str, Any], arch: str = "llama") -> Any:
    from nanoforge.model import ModelConfig

    heads = int(cfg["num_attention_heads"])
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))
    options: dict[str, Any] = {}
    if arch == "qwen2":
        options = {"qkv_bias": True}
    elif arch == "nanochat":
        options = {"mlp": "relu2", "qk_norm": True, "embed_norm": True, "norm_weights": False,
                   "logit_softcap": float(cfg.get("final_logit_softcapping") or 0.0)}
    return ModelConfig(**options,
        d_model=int(cfg["hidden_size"]), n_layers=int(cfg["num_hidden_layers"]), n_heads=heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads), ffn_dim=int(cfg["intermediate_size"]),
        vocab_size=int(cfg["vocab_size"]), max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
        rope_theta=float(theta), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), pad_vocab_to=0)


def imported_run_config(mc: Any) -> dict[str, Any]:
    """The resolved run config recorded in an imported checkpoint's meta: defaults with the model's shape,
    so that later stages (`train sft --from`, resume checks) rebuild exactly this model."""
    from nanoforge.config import RunConfig

    cfg = RunConfig()
    for k, v in mc.to_dict().items():
        setattr(cfg.model, k, v)
    return cfg.to_dict()


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors or of the shards model.safetensors.index.json lists."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    files = sorted(set(home_mod.read_json(index, "safetensors index")["weight_map"].values())) \
        if index.exists() else ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise UserError(f"{path} does not exist (only safetensors weights can be imported)")
        try:
            state.update(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]}); "
                            f"it may be corrupt or truncated") from None
    return state


def read_hf_model(src: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """(ModelConfig, our float32 state dict) of a transformers Llama, Qwen2 or NanoChat folder; refuses other
    model types and variants our model cannot represent (UserError naming the folder)."""
    from nanoforge.export.nanochat import flip_rotary_rows

    cfg = home_mod.read_json(src / "config.json", "Hugging Face config")
    arch = _check_supported(cfg, src)
    try:
        mc = _config_from_hf(cfg, arch)
    except KeyError as e:
        raise UserError(f"{src}/config.json lacks {e.args[0]!r}, which a {CLASSES[arch]} config needs") from None
    except (TypeError, ValueError) as e:
        raise UserError(f"{src}/config.json has an invalid value ({e})") from None
    ours = {our_name(k, arch): v.to(torch.float32) for k, v in read_safetensors(src).items() if "rotary_emb" not in k}
    if arch == "nanochat":  # nanochat's rotary turns the other way: flip the second half of q/k rows
        for k in [k for k in ours if k.endswith(("wq.weight", "wk.weight"))]:
            ours[k] = flip_rotary_rows(ours[k], mc.head_dim)
    if mc.tie_embeddings:
        ours.pop("output.weight", None)
    return mc, ours


def import_hf(src: str | os.PathLike, tag: str, *, phase: str = "base", force: bool = False,
              tokenizer: str | None = None) -> Path:
    """A transformers Llama, Qwen2 or NanoChat folder -> checkpoints/<phase>/<tag> (step 0, weights in
    float32). The folder's tokenizer.json is imported as tokenizers/<tag> unless `tokenizer` names an
    existing nanoforge tokenizer. Refuses other model types and variants our model cannot represent."""
    from nanoforge.checkpoint import load_weights, save_checkpoint
    from nanoforge.model import LLaMA
    from nanoforge.tokenizer import Tokenizer
    from nanoforge.tokenizer.hf import import_hf as import_tokenizer

    src = Path(src)
    if not src.is_dir():
        what = "does not exist" if not src.exists() else "is a file"
        raise UserError(f"{src} {what}: give the Hugging Face model folder (config.json, model.safetensors)")
    dest = home_mod.checkpoint_dir(phase, tag)  # a bad tag is refused before any work
    cfg = home_mod.read_json(src / "config.json", "Hugging Face config")
    mc, ours = read_hf_model(src)
    dest = home_mod.checkpoint_dir(phase, tag)
    if dest.exists() and not force:
        raise UserError(f"checkpoint {dest} already exists (use --force to replace it)")
    model = LLaMA(mc)
    load_weights(model, ours, where=str(src))
    tok = None
    if tokenizer is not None:
        tok = Tokenizer.load(tokenizer)
    elif (src / "tokenizer.json").is_file():
        known = home_mod.tokenizer_dir(tag) / "hf" / "tokenizer.json"
        if not force and known.is_file() and known.read_bytes() == (src / "tokenizer.json").read_bytes():
            tok = Tokenizer.load(known.parent.parent)  # imported before (e.g. a re-import): reuse it
        else:
            tok = Tokenizer.load(import_tokenizer(src, name=tag, force=force))
    else:
        progress.warn(f"{src} has no tokenizer.json: the checkpoint has no tokenizer; pass --tokenizer to "
                      f"commands that use it")
    if tok is not None and tok.vocab_size > mc.vocab_size:
        raise UserError(f"{src}: tokenizer has {tok.vocab_size} ids but the model only {mc.vocab_size}")
    tok_meta = None if tok is None else {"path": str(tok.path or ""), "name": tok.name,
                                         "fingerprint": tok.fingerprint}
    meta = {"phase": phase, "tag": tag, "model_config": mc.to_dict(), "config": imported_run_config(mc),
            "tokenizer": tok_meta,
            "tokens": None, "val_bpb": None, "imported_from": str(src.resolve()),
            "imported_config": {k: cfg.get(k) for k in ("_name_or_path", "transformers_version", "torch_dtype",
                                                         "dtype") if k in cfg}}
    with home_mod.atomic_dir(dest, force=force, what="checkpoint") as tmp:
        save_checkpoint(tmp, 0, model, None, meta)
    return dest
