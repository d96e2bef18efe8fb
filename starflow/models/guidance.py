"""Classifier-free guidance for affine flows (STARFlow, arXiv 2506.06276, Sec. 3.3; SPEC section 8).

For a conditional ``(a_c, b_c)`` and unconditional ``(a_u, b_u)`` scale/shift and weight ``w``,
``s = min(a_c / a_u, 1)^2``, ``a = a_c / sqrt(1 + w - w s)``, ``b = ((1 + w) b_c - w s b_u) / (1 + w - w s)``.
"""
from __future__ import annotations

import torch

__all__ = ["guide", "guidance_weights"]


def guide(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine the ``[cond; uncond]`` halves of ``a, b (2B, k, D)`` into guided parameters.

    Args:
        a, b: float32 scale and shift; rows ``[:B]`` conditional, ``[B:]`` unconditional.
        weight: guidance weight ``w`` (a float, or ``(k, 1)`` per token for annealed guidance).

    Returns:
        ``a, b (2B, k, D)``: the guided parameters, repeated for both halves so the guidance rows
        stay identical to the conditional rows.
    """
    a_c, a_u = a.chunk(2)
    b_c, b_u = b.chunk(2)
    s = torch.clamp(a_c / a_u, max=1.0).square()
    denom = 1 + weight - weight * s
    a_g = a_c / denom.sqrt()
    b_g = ((1 + weight) * b_c - weight * s * b_u) / denom
    return torch.cat([a_g, a_g]), torch.cat([b_g, b_g])


def guidance_weights(weight: float, start: int, stop: int, total: int, anneal: bool,
                     device: torch.device) -> torch.Tensor | float:
    """Guidance weight for tokens ``[start, stop)`` of ``total``: ``w``, or ``w (t + 1) / total`` annealed."""
    if not anneal:
        return weight
    t = torch.arange(start, stop, device=device, dtype=torch.float32)
    return (weight * (t + 1) / total)[:, None]
