"""Run configuration: typed sections (model, train, data, tokenizer, eval), TOML presets in
nanoforge/presets/, `--set section.key=value` overrides, validation with one-line errors.

    cfg = load_config(preset="cpu-demo", overrides=["train.max_steps=50", "model.depth=4"])
    cfg.model_config()      # -> nanoforge.model.ModelConfig
    cfg.to_toml()           # the resolved config, written next to every run

`model.depth = N` is nanochat's dial: it sets width 64·N, N layers, heads width/128 (explicit
`--set model.d_model=...` etc. still win). `train.max_steps = 0` derives the steps from
`train.token_ratio` × parameters (Chinchilla's 20 tokens per parameter for the d* presets).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoforge.errors import UserError
from nanoforge.model.config import ModelConfig

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

PRESETS_DIR = Path(__file__).resolve().parent / "presets"


@dataclass
class ModelSection(ModelConfig):
    """The [model] section: a ModelConfig plus nanochat's depth dial."""

    depth: int = 0  # > 0: derive d_model, n_layers, n_heads, n_kv_heads, head_dim, ffn_dim from it


@dataclass
class TrainSection:
    max_steps: int = 100           # 0: derive from token_ratio × parameters / total_batch_tokens
    token_ratio: float = 20.0      # tokens per parameter when max_steps = 0
    total_batch_tokens: int = 8192  # tokens per optimizer step, across all ranks and micro-steps
    device_batch_size: int = 8
    seq_len: int = 256
    optimizer: str = "adamw"       # adamw | muon
    lr: float = 3e-3               # AdamW lr (embeddings, head, norms under muon)
    min_lr_frac: float = 0.0       # the schedule ends at lr × min_lr_frac
    embedding_lr: float = 0.0      # 0: same as lr (the token embedding's AdamW lr)
    norm_lr: float = 0.0           # 0: same as lr (the RMSNorm gains' AdamW lr)
    trainable: list[str] = field(default_factory=list)  # parameters trained (fnmatch patterns of names such
                                   # as "norm.weight", "layers.*.ffn.*"); [] = all; the rest stay frozen
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0         # 0 disables
    schedule: str = "cosine"       # cosine | linear | wsd | constant
    warmup_steps: int = 10
    cooldown_frac: float = 0.2     # wsd: the last fraction of steps decays linearly
    eval_every: int = 50           # 0 disables; the last step is always evaluated
    eval_batches: int = 20         # 0 = the whole validation split
    save_every: int = 0            # 0: only at the end (and on interrupt)
    sample_every: int = 0          # 0 disables
    log_every: int = 1             # metrics.jsonl every N steps (and at every evaluation and the last step)
    keep_last: int = 2             # checkpoints kept besides the best
    seed: int = 1337
    device: str = "auto"           # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"            # auto (bf16 autocast on CUDA and on CPUs with fast bf16 products) | float32 | bfloat16
    compile: str = "auto"          # auto (on CUDA) | true | false
    parallel: str = "ddp"          # ddp | fsdp (under torchrun)
    tensorboard: bool = False
    wandb: str = ""                # a wandb project name enables it


@dataclass
class DataSection:
    layout: str = "packed"         # packed | bos_aligned | unpacked
    val_docs: int = 200


@dataclass
class SftSection:
    """[sft]: mid-training and supervised fine-tuning on conversations (`nanoforge train mid|sft`)."""

    epochs: float = 1.0            # passes over the training conversations when train.max_steps = 0
    learn: str = "assistant"       # assistant: the rendered mask (assistant turns) | all: every token (mid)
    buffer_size: int = 100         # conversations the best-fit packer chooses a row's next one from
    lr_scale: float = 1.0          # multiplies the --from checkpoint's learning rates (train.* set here win)
    val_conversations: int = 200   # held out of --data when neither --val nor a val/ split is given
    eval_every: int = 0            # > 0: sets train.eval_every (held-out loss; the last step always)
    optimizer: str = ""            # adamw | muon: sets train.optimizer for the phase; "" = the checkpoint's


@dataclass
class TokenizerSection:
    backend: str = "rustbpe"
    vocab_size: int = 4096
    max_chars: int = 0             # 0 = all
    doc_cap: int = 0               # 0 = no cap


@dataclass
class EvalSection:
    tasks: list[str] = field(default_factory=list)
    limit: int = 0
    prompts: list[str] = field(default_factory=lambda: ["The capital of France is", "Once upon a time"])
    max_new_tokens: int = 32


@dataclass
class RLSection:
    """[rl]: `nanoforge train rl`, policy gradient with a group baseline (nanoforge/train/rl.py). The
    optimizer, schedule, clipping, batch and evaluation cadence are train.* (presets/phases/rl.toml)."""

    data: str = ""                 # chat data with `#### n` answers; "" = the default chat data's arithmetic
    max_steps: int = 30            # when train.max_steps = 0
    prompts_per_step: int = 4      # per process
    group_size: int = 8            # completions sampled per prompt
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0                 # 0 = the whole vocabulary
    sample_batch: int = 0          # rows the engine decodes at once (rollouts and evaluation); 0 = a step's
                                   # rollouts, prompts_per_step × group_size (its KV cache grows to that)
    lr_scale: float = 0.1          # multiplies the --from checkpoint's learning rates (train.* set here win)
    kl_coef: float = 0.0           # > 0: k3 KL penalty to the starting model
    normalize_std: bool = False    # advantages divided by the group's standard deviation
    positive_only: bool = False    # negative advantages → 0: only completions above their group's mean are trained
    norm_lr: float = 0.0           # > 0: the RMSNorm gains' learning rate in RL (sets train.norm_lr; their
                                   # scale is how sharp the policy is, which RL on a small model moves most)
    trainable: list[str] = field(default_factory=list)  # non-empty: sets train.trainable for RL (the
                                   # cpu-demo trains the final norm's gains only)
    format_reward: float = 0.0     # reward for a wrong answer that still has the `#### n` form
    eval_prompts: int = 64         # held-out prompts for pass@1 / pass@k (every train.eval_every steps)
    eval_every: int = 0            # > 0: sets train.eval_every (the start and the last step are always scored)
    eval_samples: int = 4          # k of pass@k (samples per held-out prompt)


@dataclass
class SpeedrunSection:
    until: str = "rl"              # base | sft | rl: the last training stage of `nanoforge speedrun`
    chat_data: str = ""            # SFT data of the speedrun; "" = the offline default chat data
    chat_eval_limit: int = 0       # held-out prompts per chat task (0 = all)


SECTIONS: dict[str, type] = {"model": ModelSection, "train": TrainSection, "data": DataSection,
                             "tokenizer": TokenizerSection, "eval": EvalSection, "sft": SftSection,
                             "rl": RLSection, "speedrun": SpeedrunSection}
OPTIMIZERS = ("adamw", "muon")
CHOICES = {("train", "optimizer"): OPTIMIZERS,
           ("train", "schedule"): ("cosine", "linear", "wsd", "constant"),
           ("train", "dtype"): ("auto", "float32", "bfloat16"),
           ("train", "compile"): ("auto", "true", "false"),
           ("train", "parallel"): ("ddp", "fsdp"),
           ("speedrun", "until"): ("base", "sft", "rl"),
           ("data", "layout"): ("packed", "bos_aligned", "unpacked"),
           ("sft", "learn"): ("assistant", "all"),
           ("sft", "optimizer"): ("", *OPTIMIZERS),  # "": the --from checkpoint's
           ("tokenizer", "backend"): ("rustbpe", "neox", "python")}
_DEPTH_KEYS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim")


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    data: DataSection = field(default_factory=DataSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    eval: EvalSection = field(default_factory=EvalSection)
    sft: SftSection = field(default_factory=SftSection)
    rl: RLSection = field(default_factory=RLSection)
    speedrun: SpeedrunSection = field(default_factory=SpeedrunSection)
    preset: str = ""

    def model_config(self) -> ModelConfig:
        d = dataclasses.asdict(self.model)
        d.pop("depth")
        return ModelConfig(**d)

    def to_dict(self) -> dict[str, Any]:
        d = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        d["preset"] = self.preset
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Rebuild a resolved config (from a checkpoint's meta or a config.toml); validated."""
        d = dict(d)
        preset = d.pop("preset", "")
        cfg = cls(preset=preset)
        for section, values in d.items():
            if section not in SECTIONS:
                raise UserError(f"unknown config section '{section}'; valid sections: {', '.join(SECTIONS)}")
            for key, value in (values or {}).items():
                _set(cfg, section, key, value)
        validate(cfg)
        return cfg

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def preset_model(name: str, overrides: list[str] | tuple[str, ...] = ()) -> ModelConfig:
    """The model of a preset (nanoforge/presets/<name>.toml), with `model.key=value` overrides."""
    return load_config(preset=name, overrides=overrides).model_config()


def load_config(preset: str | None = None, path: str | Path | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults ← preset TOML ← config file TOML ← `section.key=value` overrides; validated.
    Raises UserError for an unknown preset, section or key (naming the valid ones) and bad values."""
    cfg = RunConfig(preset=preset or "")
    layers: list[tuple[dict[str, Any], str]] = []
    if preset:
        file = PRESETS_DIR / f"{preset}.toml"
        if not file.is_file():
            raise UserError(f"unknown preset '{preset}'; available presets: {', '.join(list_presets())}")
        layers.append((_read_toml(file), f"preset {preset}"))
    if path:
        layers.append((_read_toml(Path(path)), f"config {path}"))
    explicit: set[tuple[str, str]] = set()
    for data, where in layers:
        _apply_table(cfg, data, where)
    for item in overrides:
        section, key, value = _parse_override(item)
        _set(cfg, section, key, value, f"--set {item}")
        explicit.add((section, key))
    if cfg.model.depth > 0:
        from nanoforge.model.config import depth_config

        for key, value in depth_config(cfg.model.depth).items():
            if ("model", key) not in explicit:
                setattr(cfg.model, key, value)
    cfg.model.max_seq_len = max(cfg.model.max_seq_len, cfg.train.seq_len)
    validate(cfg)
    return cfg


def _apply_table(cfg: RunConfig, data: dict[str, Any], where: str) -> set[tuple[str, str]]:
    """Set every `[section] key = value` of one TOML table on `cfg`; returns the (section, key) pairs set."""
    touched: set[tuple[str, str]] = set()
    for section, values in data.items():
        if section == "preset":
            continue
        if section not in SECTIONS or not isinstance(values, dict):
            raise UserError(f"{where}: unknown section '{section}'; valid sections: {', '.join(SECTIONS)}")
        for key, value in values.items():
            _set(cfg, section, key, value, where)
            touched.add((section, key))
    return touched


def apply_layers(cfg: RunConfig, layers: list[tuple[str | Path, str]] = (),
                 overrides: list[str] | tuple[str, ...] = ()) -> set[tuple[str, str]]:
    """Apply TOML files [(path, what)] and then `section.key=value` overrides onto `cfg` in place (no depth
    derivation, not validated); returns the (section, key) pairs they set. The chat stages start from a
    base checkpoint's resolved config and put their phase defaults and the user's settings on top."""
    touched: set[tuple[str, str]] = set()
    for path, where in layers:
        touched |= _apply_table(cfg, _read_toml(Path(path)), where)
    for item in overrides:
        section, key, value = _parse_override(item)
        _set(cfg, section, key, value, f"--set {item}")
        touched.add((section, key))
    return touched


# The range of every numeric key, checked once here: "> 0", ">= 0", or an interval "[0, 1)". Every float
# key (listed or not, in any section) must also be finite: nan and inf are refused everywhere.
RANGES: dict[tuple[str, str], str] = {
    ("model", "depth"): ">= 0", ("model", "rope_theta"): "> 0", ("model", "norm_eps"): "> 0",
    ("train", "max_steps"): ">= 0", ("train", "token_ratio"): "> 0", ("train", "total_batch_tokens"): "> 0",
    ("train", "device_batch_size"): "> 0", ("train", "seq_len"): "> 0", ("train", "lr"): "> 0",
    ("train", "min_lr_frac"): "[0, 1]", ("train", "embedding_lr"): ">= 0", ("train", "norm_lr"): ">= 0",
    ("train", "muon_lr"): "> 0",
    ("train", "muon_momentum"): "[0, 1)", ("train", "weight_decay"): ">= 0", ("train", "beta1"): "[0, 1)",
    ("train", "beta2"): "[0, 1)", ("train", "eps"): "> 0", ("train", "grad_clip"): ">= 0",
    ("train", "warmup_steps"): ">= 0", ("train", "cooldown_frac"): "[0, 1]", ("train", "eval_every"): ">= 0",
    ("train", "eval_batches"): ">= 0", ("train", "save_every"): ">= 0", ("train", "sample_every"): ">= 0",
    ("train", "log_every"): ">= 0", ("train", "keep_last"): ">= 0", ("train", "seed"): ">= 0",
    ("data", "val_docs"): ">= 0",
    ("tokenizer", "vocab_size"): "> 0", ("tokenizer", "max_chars"): ">= 0", ("tokenizer", "doc_cap"): ">= 0",
    ("eval", "limit"): ">= 0", ("eval", "max_new_tokens"): ">= 0",
    ("model", "logit_softcap"): ">= 0",
    ("sft", "epochs"): "> 0", ("sft", "buffer_size"): ">= 1", ("sft", "lr_scale"): "> 0",
    ("sft", "val_conversations"): ">= 0", ("sft", "eval_every"): ">= 0",
    ("rl", "max_steps"): "> 0", ("rl", "prompts_per_step"): "> 0", ("rl", "group_size"): "> 0",
    ("rl", "max_new_tokens"): "> 0", ("rl", "eval_prompts"): "> 0", ("rl", "eval_samples"): "> 0",
    ("rl", "lr_scale"): "> 0", ("rl", "temperature"): ">= 0", ("rl", "kl_coef"): ">= 0", ("rl", "norm_lr"): ">= 0",
    ("rl", "eval_every"): ">= 0",
    ("rl", "format_reward"): ">= 0", ("rl", "top_k"): ">= 0", ("rl", "sample_batch"): ">= 0",
    ("speedrun", "chat_eval_limit"): ">= 0",
}
_HINTS = {("train", "max_steps"): " (0 = derive from train.token_ratio)", ("train", "grad_clip"): " (0 disables)"}


def in_range(value: float, spec: str) -> bool:
    """Whether `value` satisfies a RANGES spec ("> 0", ">= 0", "[0, 1)", ...)."""
    if spec.startswith(">="):
        return value >= float(spec[2:])
    if spec.startswith(">"):
        return value > float(spec[1:])
    lo, hi = (float(x) for x in spec[1:-1].split(","))
    return (value >= lo if spec[0] == "[" else value > lo) and (value <= hi if spec[-1] == "]" else value < hi)


def validate(cfg: RunConfig) -> None:
    """Every choice key among its choices, every float finite, every numeric key in its RANGES; UserError
    naming the key, the allowed range and the value otherwise."""
    for (section, key), choices in CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in choices:
            allowed = ", ".join(c or '""' for c in choices)
            raise UserError(f"{section}.{key} must be one of {allowed}, got '{value}'")
    for section in SECTIONS:
        obj = getattr(cfg, section)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                raise UserError(f"{section}.{f.name} must be a finite number, got {value}")
            spec = RANGES.get((section, f.name))
            if spec and not in_range(value, spec):
                shown = spec if spec[0] in "<>" else f"in {spec}"
                raise UserError(f"{section}.{f.name} must be {shown}{_HINTS.get((section, f.name), '')}, "
                                f"got {value}")
    cfg.model_config()  # ModelConfig validates the shape


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {path} is not valid TOML: {e}") from None


def _parse_override(item: str) -> tuple[str, str, Any]:
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise UserError(f"--set expects section.key=value (e.g. train.lr=1e-3), got '{item}'")
    name, raw = item.split("=", 1)
    section, key = name.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare string such as train.optimizer=muon
    return section, key, value


def _set(cfg: RunConfig, section: str, key: str, value: Any, where: str = "config") -> None:
    if section not in SECTIONS:
        raise UserError(f"{where}: unknown section '{section}'; valid sections: {', '.join(SECTIONS)}")
    obj = getattr(cfg, section)
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if key not in fields:
        raise UserError(f"{where}: unknown key '{section}.{key}'; valid keys: "
                        f"{', '.join(f'{section}.{k}' for k in fields)}")
    default = getattr(type(obj)(), key)
    setattr(obj, key, _coerce(value, default, f"{section}.{key}", where))


def _coerce(value: Any, default: Any, name: str, where: str) -> Any:
    bad = UserError(f"{where}: {name} expects {type(default).__name__}, got {value!r}")
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise bad
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or int(value) != value:
            raise bad
        return int(value)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if isinstance(default, list):
        if isinstance(value, str):
            return [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise bad
        return [str(v) for v in value]
    if isinstance(value, bool):  # compile = true in TOML
        return "true" if value else "false"
    if not isinstance(value, (str, int, float)):
        raise bad
    return str(value)
