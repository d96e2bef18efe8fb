"""Removing the training noise from sampled latents (STARFlow, arXiv 2506.06276, Sec. 3.4; SPEC section 10).

The flow models ``x + noise_std * eps``; its score gives a one-step Tweedie estimate of the clean
latent, ``x - noise_std^2 * dNLL/dx`` with NLL the per-sample negative log-likelihood summed over dims.
"""
from __future__ import annotations

import torch

__all__ = ["self_denoise"]


def self_denoise(model, x: torch.Tensor, y: torch.Tensor | None, noise_std: float) -> torch.Tensor:
    """One Tweedie step with the flow's own likelihood: ``x - noise_std^2 * grad_x NLL(x | y)``.

    Args:
        model: a :class:`~starflow.models.STARFlow`.
        x: ``(B, C, H, W)`` or ``(B, T, C, H, W)`` noisy latents (samples of :meth:`STARFlow.reverse`).
        y: ``(B, L, txt_dim)`` conditional text embeddings (not the guidance rows), or None.
        noise_std: std of the training noise in latent units (the config's ``noise_std``).

    Returns:
        Denoised latents, same shape, float32.
    """
    with torch.enable_grad():
        xg = x.detach().float().requires_grad_(True)
        per_dim = model.nll(xg, y)  # (B,) nats per dim
        total = (per_dim * xg[0].numel()).sum()
        (grad,) = torch.autograd.grad(total, xg)
    return (xg - noise_std ** 2 * grad).detach()
