"""Exponential moving average (EMA) of the trained weights (config ``ema: DECAY``, ``ema_start``).

After optimizer step ``s`` (counted from 1): ``e = w`` while ``s <= ema_start``, else
``e = decay * e + (1 - decay) * w``. The average is kept in float32 beside the model, one tensor per trainable
parameter, shaped and placed like the parameter: under FSDP2 each rank holds only its shard (DTensors), so
DCP checkpoints save and reshard it like the weights. ``starflow export --ema`` and ``starflow sample --ema``
use it; the final model folder of a run holds ``ema.safetensors`` beside ``model.safetensors``.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from starflow.assets import EMA_WEIGHT_NAMES

__all__ = ["EMA", "EMA_WEIGHTS"]

EMA_WEIGHTS = EMA_WEIGHT_NAMES[0]
"""File name of the averaged weights in a model folder (official layout, like ``model.safetensors``)."""


class EMA:
    """The moving average of ``model``'s trainable parameters.

    Args:
        model: the model being trained (sharded or not); its trainable parameters at construction are the
            average's starting value (call :meth:`reset` after loading other weights into the model).
        decay: the decay in ``(0, 1)``.
        start: optimizer steps during which the average just follows the weights.

    Raises:
        ValueError: ``decay`` outside ``(0, 1)`` or ``start < 0``.
    """

    def __init__(self, model: nn.Module, decay: float, start: int = 0) -> None:
        if not 0.0 < decay < 1.0 or start < 0:
            raise ValueError(f"config key 'ema' must be in (0, 1) and 'ema_start' >= 0, got {decay} and {start}")
        self.decay, self.start = decay, start
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.shadow = {name: p.detach().float().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def reset(self) -> None:
        """Set the average to the current weights."""
        for name, p in self.params.items():
            self.shadow[name].copy_(p.detach())

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the weights after optimizer step ``step`` (1-based)."""
        if step <= self.start:
            self.reset()
            return
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{parameter name: average}`` (DTensor shards under FSDP2): what DCP checkpoints store."""
        return self.shadow

    def full_state_dict(self, model_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A complete official-layout state dict: ``model_state`` (full tensors, e.g. the gathered weights) with
        every averaged parameter replaced by its full average in the weights' dtype. Every rank must call it
        under FSDP2 (shards are gathered one parameter at a time, each moved to the CPU before the next, so the
        device holds one full parameter at a time); an empty ``model_state`` (ranks > 0) gives ``{}``."""
        out = dict(model_state)
        for name, e in self.shadow.items():
            full = e.full_tensor() if hasattr(e, "full_tensor") else e  # a collective: every rank gathers
            if model_state:  # ranks other than 0 of a sharded model get no gathered weights
                out[name] = full.detach().cpu().to(model_state[name].dtype)
        return out
