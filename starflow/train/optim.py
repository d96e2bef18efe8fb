"""Optimizer and learning-rate schedule of the STARFlow recipe (arXiv 2506.06276, Sec. 4; SPEC section 14).

AdamW with betas (0.9, 0.95) and weight decay; linear warm-up from ``min(min_lr, 1e-6)`` to ``lr``,
then cosine decay to ``min_lr`` at ``steps``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from starflow.config import Config

__all__ = ["build_optimizer", "build_schedule", "build_cosine_schedule", "rebase_schedule", "lr_at", "ADAM_BETAS"]

ADAM_BETAS = (0.9, 0.95)
WARMUP_START_LR = 1e-6


def build_optimizer(params, cfg: Config, lr: float | None = None, weight_decay: float | None = None,
                    betas: tuple[float, float] = ADAM_BETAS) -> torch.optim.AdamW:
    """AdamW over ``params`` with the recipe's betas (SPEC section 14; ``betas`` for another optimizer, as the learned
    denoiser's); ``lr``/``weight_decay`` default to the config's."""
    return torch.optim.AdamW(list(params), lr=cfg.lr if lr is None else lr, betas=betas,
                             weight_decay=cfg.weight_decay if weight_decay is None else weight_decay)


def lr_at(step: int, cfg: Config) -> float:
    """Learning rate at optimizer step ``step`` (0-based): warm-up then cosine (SPEC section 14)."""
    start = min(cfg.min_lr, WARMUP_START_LR)
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return start + (cfg.lr - start) * step / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def build_schedule(optimizer: torch.optim.Optimizer, cfg: Config) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR following :func:`lr_at` (its state_dict restores the step on resume)."""
    base = cfg.lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg) / base)


def rebase_schedule(schedule: torch.optim.lr_scheduler.LambdaLR, base_lrs: list[float]) -> None:
    """After ``schedule.load_state_dict`` on resume: the peak rates of the current config (``load_state_dict`` restores
    the saved ones, which the current factors would then scale), and the param groups' rates at the restored step.

    Args:
        schedule: a LambdaLR of :func:`build_schedule` or :func:`build_cosine_schedule`, its state just loaded.
        base_lrs: its ``base_lrs`` as built from the current config (before loading).
    """
    schedule.base_lrs = list(base_lrs)
    for group, base, factor in zip(schedule.optimizer.param_groups, schedule.base_lrs, schedule.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * factor(schedule.last_epoch)
    schedule._last_lr = [group["lr"] for group in schedule.optimizer.param_groups]


def build_cosine_schedule(optimizer: torch.optim.Optimizer, peak: float, final: float,
                          steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine from ``peak`` (the optimizer's lr) to ``final`` over ``steps`` optimizer steps, then ``final``
    (the learnable denoiser's schedule, SPEC section 16)."""

    def factor(step: int) -> float:
        progress = min(1.0, step / max(1, steps))
        return (final + 0.5 * (peak - final) * (1 + math.cos(math.pi * progress))) / peak

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def trainable(module: nn.Module):
    """Parameters of ``module`` that require gradients."""
    return [p for p in module.parameters() if p.requires_grad]
