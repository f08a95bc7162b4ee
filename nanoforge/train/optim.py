"""Optimizers and learning-rate schedules.

- `adamw`: torch AdamW (fused on CUDA); weight decay only on 2-D matrices of the blocks and the head.
- `muon`: Muon (momentum orthogonalised by a Newton–Schulz iteration) for the 2-D matrices inside the
  blocks, AdamW for the embedding, the output head and the norms — the split nanochat uses. One optimizer
  object holds both, so checkpoints and schedules see a single state dict.
Every param group keeps `initial_lr`; `set_lr(optimizer, multiplier)` applies the schedule.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from nanoforge.model import gemm


def lr_multiplier(step: int, max_steps: int, *, schedule: str, warmup_steps: int, min_lr_frac: float = 0.0,
                  cooldown_frac: float = 0.2) -> float:
    """The learning-rate factor for optimizer step `step` (0-based) of `max_steps`: linear warmup, then
    cosine | linear | wsd (stable, then a linear decay over the last cooldown_frac) | constant."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        decay_start = max(warmup_steps, round(max_steps * (1.0 - cooldown_frac)))
        if step < decay_start:
            return 1.0
        progress = (step - decay_start + 1) / max(1, max_steps - decay_start)
    else:
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        return min_lr_frac + (1.0 - min_lr_frac) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - (1.0 - min_lr_frac) * progress  # linear, and the wsd cooldown


def set_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * multiplier
    return optimizer.param_groups[0]["lr"]


def zeropower_via_newtonschulz5(G: torch.Tensor, steps: int = 5, bf16: bool = False) -> torch.Tensor:
    """An approximately orthogonal matrix with G's singular vectors (Keller Jordan's quintic iteration;
    coefficients chosen to push singular values towards 1 fast, not exactly). Computed in bf16 on GPUs and
    where `bf16` says so (a run under CPU bf16 autocast), else in fp32; the result has G's dtype."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16() if bf16 or G.is_cuda else G.float()
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    nt, nn_ = (gemm.mm_nt, gemm.mm_nn) if X.dim() == 2 else (lambda p, q: p @ q.mT, torch.matmul)
    for _ in range(steps):  # 2-D products on a CPU go through oneDNN where it is faster (model/gemm.py)
        A = nt(X, X)
        B = b * A + c * nn_(A, A)
        X = a * X + nn_(B, X)
    if transposed:
        X = X.mT
    return X.to(G.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """Groups with kind="muon" get Nesterov momentum orthogonalised by Newton–Schulz and scaled by
    sqrt(max(1, rows/cols)); groups with kind="adamw" get AdamW. Handles FSDP2 DTensor parameters by
    orthogonalising the full gradient (every rank computes the same update, then keeps its shard).
    Newton–Schulz runs in bf16 on GPUs and, with `ns_bf16`, on a CPU (a run under CPU bf16 autocast:
    1.7× faster on Zen 4), else in fp32."""

    def __init__(self, groups: list[dict[str, Any]], *, momentum: float = 0.95, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.0, ns_steps: int = 5, ns_bf16: bool = False) -> None:
        defaults = dict(lr=0.02, momentum=momentum, betas=betas, eps=eps, weight_decay=weight_decay,
                        ns_steps=ns_steps, kind="adamw")
        super().__init__(groups, defaults)
        self.ns_bf16 = ns_bf16

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # noqa: D401
        for group in self.param_groups:
            if group["kind"] == "muon":
                self._muon(group)
            else:
                self._adamw(group)

    def _muon(self, group: dict[str, Any]) -> None:
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - group["momentum"])
            g = p.grad.lerp(buf, group["momentum"])  # Nesterov
            update = _orthogonalise(g, group["ns_steps"], self.ns_bf16)
            if group["weight_decay"]:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(update, alpha=-group["lr"] * max(1.0, p.size(-2) / p.size(-1)) ** 0.5)

    def _adamw(self, group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = state["step"].item()
            if group["weight_decay"]:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            state["exp_avg"].lerp_(p.grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
            p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** t))


def _orthogonalise(g: torch.Tensor, steps: int, bf16: bool) -> torch.Tensor:
    try:
        from torch.distributed.tensor import DTensor, distribute_tensor
    except ImportError:  # pragma: no cover - torch without distributed
        DTensor = None  # noqa: N806
    if DTensor is not None and isinstance(g, DTensor):
        full = zeropower_via_newtonschulz5(g.full_tensor(), steps, bf16)
        return distribute_tensor(full, g.device_mesh, g.placements)
    return zeropower_via_newtonschulz5(g, steps, bf16)


def freeze_except(model: nn.Module, patterns: list[str]) -> None:
    """Leave only the parameters whose names match one of the fnmatch `patterns` trainable (no patterns:
    all of them); the others get requires_grad False, so they have no gradient, no optimizer state and no
    backward past the last trained one. UserError (naming train.trainable) when a pattern matches no
    parameter."""
    from fnmatch import fnmatchcase

    from nanoforge.errors import UserError

    if not patterns:
        return
    named = list(model.named_parameters())
    matched = {pattern: {name for name, _ in named if fnmatchcase(name, pattern)} for pattern in patterns}
    for pattern, names in matched.items():
        if not names:
            raise UserError(f"train.trainable: '{pattern}' matches no parameter of the model (names look like "
                            f"{named[0][0]!r}, {named[-1][0]!r}; * matches any characters, '.' included)")
    keep = set().union(*matched.values())
    for name, p in named:
        p.requires_grad_(name in keep)


def build_optimizer(model: nn.Module, train: Any, device_type: str = "cpu", bf16: bool = False) -> torch.optim.Optimizer:
    """AdamW or Muon+AdamW for `model` from a TrainSection; param groups carry `initial_lr`. `bf16`: the run
    trains under bf16 autocast, so Muon's Newton–Schulz runs in bf16 on a CPU too."""
    matrices, embeddings, head, norms = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = name.replace("_orig_mod.", "").replace("module.", "")
        if name.startswith("tok_embeddings"):
            embeddings.append(p)
        elif name.startswith("output"):
            head.append(p)
        elif p.dim() == 2:
            matrices.append(p)
        else:
            norms.append(p)
    emb_lr = train.embedding_lr or train.lr
    norm_lr = train.norm_lr or train.lr
    betas = (train.beta1, train.beta2)
    if train.optimizer == "muon":
        groups = [dict(params=matrices, lr=train.muon_lr, kind="muon", weight_decay=0.0),
                  dict(params=embeddings, lr=emb_lr, kind="adamw", weight_decay=0.0),
                  dict(params=head, lr=train.lr, kind="adamw", weight_decay=train.weight_decay),
                  dict(params=norms, lr=norm_lr, kind="adamw", weight_decay=0.0)]
        groups = [g for g in groups if g["params"]]
        opt: torch.optim.Optimizer = MuonAdamW(groups, momentum=train.muon_momentum, betas=betas, eps=train.eps,
                                                   ns_bf16=bf16)
    else:
        groups = [dict(params=matrices + head, lr=train.lr, weight_decay=train.weight_decay),
                  dict(params=embeddings, lr=emb_lr, weight_decay=0.0),
                  dict(params=norms, lr=norm_lr, weight_decay=0.0)]
        groups = [g for g in groups if g["params"]]
        fused = device_type == "cuda"
        opt = torch.optim.AdamW(groups, lr=train.lr, betas=betas, eps=train.eps, fused=fused or None)
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    return opt
