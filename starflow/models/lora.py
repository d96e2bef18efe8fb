"""LoRA fine-tuning through ``peft`` (config ``lora_rank``, ``lora_alpha``, ``lora_targets``).

``peft.inject_adapter_in_model`` wraps the targeted ``nn.Linear`` layers in place: ``W x`` becomes
``W x + (alpha / r) B A x`` with ``A (r, in)`` random, ``B (out, r)`` zero, so training starts from the base
model exactly. Only ``A`` and ``B`` train (the learnable denoiser stays frozen), checkpoints hold only them,
and the base weights always come from ``init_from``. :func:`merge_lora_state` folds the adapters back into
plain official-layout weights (``W + (alpha / r) B A``) that load with strict names.

Default targets: the attention (``qkv``, ``proj``) and MLP (``main.0``, ``main.2``) projections of every layer
of the deep block.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import nn

from starflow.config import Config

__all__ = ["LORA_MARK", "ADAPTER_WEIGHTS", "default_targets", "apply_lora", "lora_parameter_count",
           "merge_lora_state", "is_lora_state"]

LORA_MARK = "lora_"
ADAPTER_WEIGHTS = "lora.safetensors"
"""File name of the adapters in a LoRA run's final model folder (beside the merged ``model.safetensors``)."""
_PROJECTIONS = r"(attention\.(qkv|proj)|mlp\.main\.(0|2))"
DENOISER_PREFIX = "learnable_self_denoiser."


def default_targets(cfg: Config) -> str:
    """Regex of the deep block's attention and MLP projections (full match on module names)."""
    return rf"blocks\.{cfg.num_blocks - 1}\.attn_blocks\.\d+\.{_PROJECTIONS}"


def _targets(cfg: Config) -> str:
    return cfg.lora_targets or default_targets(cfg)


def target_linears(model: nn.Module, cfg: Config) -> dict[str, nn.Linear]:
    """``{name: layer}`` of the ``nn.Linear`` layers the config's LoRA targets: the flow's own, never the learnable
    denoiser's (a LoRA run trains the flow's adapters only; the denoiser stays as loaded).

    Raises:
        ValueError: the pattern matches no linear layer, or only the denoiser's.
    """
    pattern = re.compile(_targets(cfg))
    found = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.fullmatch(n)}
    if found and all(n.startswith(DENOISER_PREFIX) for n in found):
        raise ValueError(f"config key 'lora_targets' {_targets(cfg)!r} matches only layers of the learnable denoiser, "
                         "which a LoRA run does not train (its loss trains the flow's adapters): target the flow's "
                         "layers (module names look like 'blocks.5.attn_blocks.0.attention.qkv')")
    found = {n: m for n, m in found.items() if not n.startswith(DENOISER_PREFIX)}
    if not found:
        raise ValueError(f"config key 'lora_targets' {_targets(cfg)!r} matches no linear layer (module names look like "
                         "'blocks.5.attn_blocks.0.attention.qkv')")
    return found


def lora_parameter_count(model: nn.Module, cfg: Config) -> int:
    """Parameters LoRA of rank ``lora_rank`` adds to the targeted layers: ``r (in + out)`` each."""
    return sum(cfg.lora_rank * (m.in_features + m.out_features) for m in target_linears(model, cfg).values())


def apply_lora(model: nn.Module, cfg: Config) -> int:
    """Inject the adapters into ``model`` in place and freeze everything else; returns the trainable count.

    Raises:
        ValueError: no layer matches ``lora_targets``.
    """
    from peft import LoraConfig, inject_adapter_in_model

    targets = sorted(target_linears(model, cfg))  # (a clear error before peft's; exact names, the denoiser's left out)
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=targets, lora_dropout=0.0,
                        bias="none")
    inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_(LORA_MARK in name)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def is_lora_state(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict holds LoRA-wrapped names (``...base_layer.weight``, ``...lora_A.default.weight``)."""
    return any(".base_layer." in k or ".lora_A." in k for k in state)


def merge_lora_state(state: Mapping[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
    """Fold the adapters of a full LoRA-wrapped state dict into official-layout weights.

    ``X.base_layer.weight`` + ``(lora_alpha / lora_rank) X.lora_B.default.weight @ X.lora_A.default.weight`` becomes
    ``X.weight``, ``X.base_layer.bias`` becomes ``X.bias``; other entries are kept.
    """
    scaling = cfg.lora_alpha / cfg.lora_rank
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        if ".base_layer." not in key:
            out[key] = value
            continue
        prefix, _, leaf = key.partition(".base_layer.")
        if leaf == "weight":
            a = state[f"{prefix}.lora_A.default.weight"].float()
            b = state[f"{prefix}.lora_B.default.weight"].float()
            value = (value.float() + scaling * (b @ a)).to(value.dtype)
        out[f"{prefix}.{leaf}"] = value
    return out
