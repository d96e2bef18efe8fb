"""Removing the training noise from sampled latents (STARFlow, arXiv 2506.06276, Sec. 3.4; SPEC section 10).

The flow models ``x + noise_std * eps``; its score gives a one-step Tweedie estimate of the clean
latent, ``x - noise_std^2 * dNLL/dx`` with NLL the per-sample negative log-likelihood summed over dims.
"""
from __future__ import annotations

import torch

__all__ = ["self_denoise", "learned_denoise", "LEARNED_DENOISER_STEP"]


def self_denoise(model, x: torch.Tensor, y: torch.Tensor | None, noise_std: float, step: float = 1.0) -> torch.Tensor:
    """One Tweedie step with the flow's own likelihood: ``x - step * noise_std^2 * grad_x NLL(x | y)``.

    Args:
        model: a :class:`~starflow.models.STARFlow`.
        x: ``(B, C, H, W)`` or ``(B, T, C, H, W)`` noisy latents (samples of :meth:`STARFlow.reverse`).
        y: ``(B, L, txt_dim)`` conditional text embeddings (not the guidance rows), or None.
        noise_std: std of the training noise in latent units (the config's ``noise_std``).
        step: factor of the update (``starflow sample --self_denoising_lr``); 1 is Tweedie's formula.

    Returns:
        Denoised latents, same shape, float32.

    Raises:
        ValueError: ``y`` is None for a text-conditioned model (from :meth:`STARFlow.nll`).
        RuntimeError: the model's parameters were made under ``torch.inference_mode`` (no gradient through them).
    """
    if next(model.parameters()).is_inference():
        raise RuntimeError("self_denoise needs the gradient of the model, whose parameters were made under "
                           "torch.inference_mode: build or load the model outside it (Pipeline.from_pretrained does), "
                           "or sample without the denoising step (self_denoise=False)")
    with torch.inference_mode(False), torch.enable_grad():  # (also when called under inference_mode)
        xg = x.detach().float().clone().requires_grad_(True)  # clones: normal tensors, even of inference ones
        per_dim = model.nll(xg, None if y is None else y.clone())  # (B,) nats per dim
        total = (per_dim * xg[0].numel()).sum()
        (grad,) = torch.autograd.grad(total, xg)
    return (xg - step * noise_std ** 2 * grad).detach()


LEARNED_DENOISER_STEP = 0.3
"""Step of the learnable denoiser, ``x <- x - 0.3 * D(x, y)`` (SPEC section 10)."""


@torch.no_grad()
def learned_denoise(model, x: torch.Tensor, y: torch.Tensor | None, window: int | None = None,
                    step: float = LEARNED_DENOISER_STEP) -> torch.Tensor:
    """Remove the training noise with the learnable denoiser (STARFlow-V Sec. 3.3; SPEC section 10).

    ``x - step * D(x, y)``; D predicts ``noise_std * dNLL/dx``. Videos longer than ``window`` latent frames are
    denoised window by window, each window after the first starting ``denoiser_window`` frames back (``window - 1``
    without a ``denoiser_window``: the denoiser then saw the whole clip in training) so that every frame sees as many
    past frames as in training; only the new frames of a window are kept.

    Args:
        model: a :class:`~starflow.models.STARFlow` with ``learnable_self_denoiser``.
        x: ``(B, T, C, H, W)`` sampled latents.
        y: ``(B, L, txt_dim)`` conditional text embeddings, or None.
        window: latent frames per denoiser pass (the training length), None = all at once.
        step: the update's weight.

    Returns:
        Denoised latents, float32, same shape.

    Raises:
        RuntimeError: the model has no learnable denoiser (``learnable_self_denoiser`` 0).
    """
    frames = x.shape[1]
    if window is None or frames <= window:
        return (x - step * model.denoiser(x, y).float()).float()
    # past frames each window carries: denoiser_window (G), or without one (attention over the whole clip in
    # training) all the window's other frames
    g = model.config.denoiser_window
    overlap = window - 1 if g is None else min(g, window - 1)
    out, start = x.clone().float(), 0
    while True:
        end = min(start + window, frames)
        d = model.denoiser(x[:, start:end], y).float()
        keep = 0 if start == 0 else overlap  # the overlapping frames were finished by the previous window
        out[:, start + keep : end] = x[:, start + keep : end] - step * d[:, keep:]
        if end == frames:
            return out
        start = end - overlap
