"""`nanoforge pull` / `nanoforge push`: models, tokenizers, corpora and nanochat bundles to and from the
Hugging Face Hub, through `huggingface_hub` (so HF_ENDPOINT, HF_TOKEN and offline mode apply as usual).

    pull("someone/de-125m")                              # an export      -> exports/de-125m
    pull("someone/de32k", kind="tokenizer")              # a tokenizer    -> tokenizers/de32k
    pull("someone/german-corpus", kind="dataset")        # parquet shards -> corpora/german-corpus
    pull("karpathy/nanochat-d32", kind="nanochat")       # nanochat files -> nanochat/nanochat-d32, imported
    push("exports/de-125m", "someone/de-125m")           # with a generated model card (README.md)

A pull downloads into a hidden staging folder beside the destination (huggingface_hub resumes its
`.incomplete` files there when rerun), verifies what arrived (the tokenizer loads and matches its
fingerprint, the model's config and weights read, every shard is parquet with a `text` column), and only
then renames it into place: the destination never holds a half-downloaded or unverified artefact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from nanoforge import home as home_mod
from nanoforge import progress
from nanoforge.errors import UserError

KINDS = ("model", "tokenizer", "dataset", "nanochat")
_NANOCHAT_FILES = ["model_*.pt", "meta_*.json", "tokenizer.pkl", "token_bytes.pt", "README.md"]


def _hub_errors(repo: str, what: str) -> Any:
    """Context manager mapping huggingface_hub's errors to one-line UserErrors."""
    import contextlib

    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    @contextlib.contextmanager
    def ctx() -> Any:
        try:
            yield
        except (GatedRepoError, RepositoryNotFoundError):
            raise UserError(f"repository {repo!r} not found or not accessible (check the name, the --kind, or "
                            f"set HF_TOKEN for a private/gated one)") from None
        except RevisionNotFoundError:
            raise UserError(f"repository {repo!r} has no such revision") from None
        except EntryNotFoundError as e:
            raise UserError(f"repository {repo!r}: {str(e).splitlines()[0]}") from None
        except OfflineModeIsEnabled:
            raise UserError(f"cannot {what} {repo}: offline mode (HF_HUB_OFFLINE) is on") from None
        except HfHubHTTPError as e:
            status = getattr(getattr(e, "response", None), "status_code", None)
            if status in (401, 403):
                raise UserError(f"the Hub refused to {what} {repo} (HTTP {status}): check that HF_TOKEN is valid "
                                f"and may write to it") from None
            raise

    return ctx()


def _quiet_unless_bars() -> None:
    """huggingface_hub draws its own tqdm bars: only where nanoforge shows bars (a terminal) do they show."""
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    (enable_progress_bars if progress._bars_enabled else disable_progress_bars)()


def _dest(kind: str, name: str) -> Path:
    return {"model": home_mod.export_dir, "tokenizer": home_mod.tokenizer_dir, "dataset": home_mod.corpus_dir,
            "nanochat": lambda n: home_mod.home() / "nanochat" / n}[kind](name)


def _verify(kind: str, folder: Path, repo: str) -> None:
    """UserError naming the problem if `folder` is not a usable artefact of `kind`."""
    if kind == "model":
        from nanoforge.export.hf import _check_supported, read_safetensors

        cfg = home_mod.read_json(folder / "config.json", "Hugging Face config")
        _check_supported(cfg, folder)
        read_safetensors(folder)
    elif kind == "tokenizer":
        from nanoforge.tokenizer import Tokenizer

        if (folder / "nanoforge.json").is_file():
            Tokenizer.load(folder)  # checks the fingerprint against the ranks
        elif not (folder / "tokenizer.json").is_file():
            raise UserError(f"{repo} holds neither a nanoforge tokenizer (nanoforge.json) nor a tokenizer.json")
    elif kind == "dataset":
        from nanoforge.data import corpus as corpus_mod

        shards = sorted(folder.rglob("*.parquet"))
        if not shards:
            raise UserError(f"dataset {repo} has no parquet files")
        for p in shards:
            corpus_mod.parquet_file(p, "text")
    elif not any(folder.glob("model_*.pt")):
        raise UserError(f"{repo} holds no nanochat checkpoint (model_<step>.pt)")


def pull(repo: str, *, kind: str = "model", revision: str | None = None, name: str | None = None,
         force: bool = False, phase: str = "base") -> Path:
    """Download `repo` (a Hub repository of `kind`) into its place under $NANOFORGE_HOME (see the module
    docstring) and return that folder; for kind "nanochat" the bundle is also imported and the checkpoint
    folder (checkpoints/<phase>/<name>) is returned. A Hub tokenizer without nanoforge.json is imported
    from its tokenizer.json. Refuses an existing destination unless `force`."""
    if kind not in KINDS:
        raise UserError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    name = name or repo.rstrip("/").split("/")[-1]
    home_mod.check_name(name, "--name")
    dest = _dest(kind, name)
    with home_mod.lock(dest, kind):
        return _pull_locked(repo, kind, revision, name, dest, force, phase)


def _pull_locked(repo: str, kind: str, revision: str | None, name: str, dest: Path, force: bool,
                 phase: str) -> Path:
    from huggingface_hub import snapshot_download

    if dest.exists() and not force:
        raise UserError(f"{dest} already exists (use --force to replace it)")
    staging = dest.parent / f".pull-{name}"
    patterns = _NANOCHAT_FILES if kind == "nanochat" else None
    _quiet_unless_bars()
    with _hub_errors(repo, "download"):
        snapshot_download(repo, repo_type="dataset" if kind == "dataset" else "model", revision=revision,
                          local_dir=staging, allow_patterns=patterns)
    shutil.rmtree(staging / ".cache", ignore_errors=True)  # huggingface_hub's bookkeeping, not content
    try:
        _verify(kind, staging, repo)
    except UserError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"downloaded {repo} is not a usable {kind}: {e}") from None
    if kind == "tokenizer" and not (staging / "nanoforge.json").is_file():
        from nanoforge.tokenizer.hf import import_hf as import_tokenizer

        out = import_tokenizer(staging, name=name, force=force)
        shutil.rmtree(staging, ignore_errors=True)
        return out
    with home_mod.atomic_dir(dest, force=force, what=kind) as tmp:
        for p in staging.iterdir():
            os.replace(p, tmp / p.name)
    shutil.rmtree(staging, ignore_errors=True)
    if kind == "nanochat":
        from nanoforge.export.nanochat import import_nanochat

        return import_nanochat(dest, name, phase=phase, force=force)
    return dest


def detect_kind(folder: Path) -> str:
    """"tokenizer", "model" (an export) or "dataset" (parquet shards) for a folder; UserError otherwise."""
    if (folder / "nanoforge.json").is_file() and (folder / "config.json").is_file():
        return "model"
    if (folder / "nanoforge.json").is_file():
        return "tokenizer"
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return "model"
    if any(folder.glob("*.parquet")):
        return "dataset"
    raise UserError(f"{folder} is not a tokenizer folder (nanoforge.json), a model export (config.json + "
                    f"*.safetensors) or a folder of parquet shards: nothing to push")


def _resolve(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if os.sep not in str(path):
        for kind in ("model", "tokenizer", "dataset"):
            if _dest(kind, str(path)).is_dir():
                return _dest(kind, str(path))
    raise UserError(f"{path} does not exist (give a folder, or the name of an export, tokenizer or corpus)")


def model_card(folder: Path, repo: str) -> str:
    """README.md for an export: architecture, parameters, tokenizer, training data, steps, tokens and the
    evaluation the checkpoint and its run recorded."""
    from nanoforge.model import ModelConfig

    info = home_mod.read_json(folder / "nanoforge.json", "export info") if (folder / "nanoforge.json").is_file() else {}
    cfg = home_mod.read_json(folder / "config.json", "Hugging Face config")
    arch = (cfg.get("architectures") or ["?"])[0]
    mc = ModelConfig.from_dict(info["model_config"]) if info.get("model_config") else None
    meta: dict[str, Any] = {}
    if info.get("source") and info.get("step") is not None:
        meta_path = Path(info["source"]) / f"meta_{int(info['step']):06d}.json"
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
    train = ((meta.get("config") or {}).get("train") or {})
    step = info.get("step")
    tokens = step * train["total_batch_tokens"] if step and train.get("total_batch_tokens") else None
    rows = [("architecture", f"`{arch}` (model_type `{cfg.get('model_type')}`)"),
            ("parameters", f"{mc.num_params():,}" if mc else "?"),
            ("layers × width", f"{cfg.get('num_hidden_layers')} × {cfg.get('hidden_size')}, "
                               f"{cfg.get('num_attention_heads')} heads ({cfg.get('num_key_value_heads')} kv)"),
            ("vocabulary", f"{cfg.get('vocab_size'):,}" if cfg.get("vocab_size") else "?"),
            ("tokenizer", (info.get("tokenizer") or {}).get("name") or "?"),
            ("training data", meta.get("tokens") or "?"),
            ("steps", f"{step:,}" if isinstance(step, int) else "?"),
            ("tokens seen", f"{tokens:,}" if tokens else "?"),
            ("dtype", info.get("dtype") or cfg.get("torch_dtype") or "?")]
    evals: list[tuple[str, str]] = []
    if meta.get("val_bpb") is not None:
        evals.append(("val_bpb", f"{meta['val_bpb']:.4f}"))
    summary = home_mod.run_dir(meta["run"]) / "summary.json" if meta.get("run") else None
    if summary is not None and summary.is_file():
        data = json.loads(summary.read_text(encoding="utf-8"))
        for stage, values in sorted((data.get("stages") or data).items()):
            if isinstance(values, dict):
                for k, v in sorted(values.items()):
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        evals.append((f"{stage}.{k}", f"{v:.4g}"))
    lines = ["---", "library_name: transformers", "tags:", "- nanoforge", f"- {cfg.get('model_type')}", "---", "",
             f"# {repo.split('/')[-1]}", "", "A small language model trained with nanoforge.", "",
             "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]
    if evals:
        lines += ["## Evaluation", "", "| metric | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in evals), ""]
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f'tok = AutoTokenizer.from_pretrained("{repo}")',
              f'model = AutoModelForCausalLM.from_pretrained("{repo}")', "```", ""]
    return "\n".join(lines)


def push(path: str | os.PathLike, repo: str, *, private: bool = False, revision: str | None = None,
         message: str | None = None) -> dict[str, Any]:
    """Upload a tokenizer folder, a model export (adding a generated README.md model card when it has
    none) or a folder of parquet shards to `repo` (created if missing) in one commit. Returns
    {"repo", "kind", "files", "commit", "url"}. UserError without a Hugging Face token."""
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    folder = _resolve(path)
    kind = detect_kind(folder)
    if not get_token():
        raise UserError("no Hugging Face token: set HF_TOKEN (or run `hf auth login`) to push")
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    ops = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p)) for p in files]
    if kind == "model" and not (folder / "README.md").is_file():
        ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=model_card(folder, repo).encode()))
    repo_type = "dataset" if kind == "dataset" else "model"
    api = HfApi()
    _quiet_unless_bars()
    with _hub_errors(repo, "push to"):
        api.create_repo(repo, repo_type=repo_type, private=private, exist_ok=True)
        info = api.create_commit(repo, ops, repo_type=repo_type, revision=revision,
                                 commit_message=message or f"nanoforge push: {kind} {folder.name}")
    progress.log(f"pushed {len(ops)} file(s) to {repo}")
    return {"repo": repo, "kind": kind, "files": [op.path_in_repo for op in ops], "commit": info.oid,
            "url": info.commit_url}
