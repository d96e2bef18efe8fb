"""The learnable self-denoiser of STARFlow-V (arXiv 2511.20462, Sec. 3.3; SPEC section 10).

A non-causal transformer ``D(x, y)`` that predicts ``noise_std * dNLL/dx`` for a noisy video latent,
so sampled latents are cleaned with one cheap pass instead of a backward pass through the flow.
Its attention is block-causal in time with a window: a token of frame ``f_q`` sees the text and the
frames ``f_q + A - 1 - G .. f_q + A - 1`` (``A = temporal_causal``, ``G = denoiser_window``).
"""
from __future__ import annotations

import torch
from torch import nn

from starflow.models.layers import AttentionBlock, RMSNorm, Rope

__all__ = ["Denoiser", "denoiser_mask", "DENOISER_LAYERS"]

DENOISER_LAYERS = 8
TEXT_QUERY_FRAME = -1  # frame index given to text queries in the mask


def denoiser_mask(txt_len: int, frames: int, frame_tokens: int, block_causal: int, window: int | None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean attention mask ``(L + T*F, L + T*F)`` (True = attend) of the denoiser.

    Key ``k`` is visible from query ``q`` if ``k`` is a text token, or its frame ``f_k`` satisfies
    ``f_q + A - 1 - G <= f_k <= f_q' + A - 1`` where ``f_q`` is the query's frame (``-1`` for text
    queries) and ``f_q'`` the same with text queries clamped to frame 0. ``A = 0`` means no
    temporal restriction; ``G = None`` means no window.

    Args:
        txt_len: text tokens L (first in the sequence).
        frames: latent frames T.
        frame_tokens: tokens per frame F.
        block_causal: A (``temporal_causal``).
        window: G (``denoiser_window``), or None.
    """
    frame = torch.arange(frames, device=device).repeat_interleave(frame_tokens)
    fq = torch.cat([torch.full((txt_len,), TEXT_QUERY_FRAME, device=device), frame])  # (S,)
    is_text = torch.cat([torch.ones(txt_len, dtype=torch.bool, device=device),
                         torch.zeros(frames * frame_tokens, dtype=torch.bool, device=device)])
    if block_causal <= 0:
        return torch.ones(fq.numel(), fq.numel(), dtype=torch.bool, device=device)
    fk = fq[None, :]
    upper = fq.clamp(min=0)[:, None] + block_causal - 1
    visible = fk <= upper
    if window is not None:
        visible &= fk >= fq[:, None] + block_causal - 1 - window
    return visible | is_text[None, :]


class Denoiser(nn.Module):
    """Non-causal transformer over tokens ``(B, N, D)`` predicting ``noise_std * dNLL/dx`` per token.

    Args:
        in_dim: token width D.
        width: transformer width (the config's ``channels``).
        head_dim: attention head width.
        txt_dim: text width if the denoiser is conditional (``conditional_denoiser``), else None.
        block_causal: A of the attention mask (``temporal_causal``).
        window: G of the attention mask (``denoiser_window``).
    """

    def __init__(self, in_dim: int, width: int, head_dim: int, txt_dim: int | None, block_causal: int,
                 window: int | None, num_layers: int = DENOISER_LAYERS) -> None:
        super().__init__()
        self.block_causal, self.window = block_causal, window
        self.proj_in = nn.Linear(in_dim, width)
        self.proj_txt = nn.Linear(txt_dim, width) if txt_dim else None
        self.attn_blocks = nn.ModuleList(AttentionBlock(width, head_dim) for _ in range(num_layers))
        self.final_norm = RMSNorm(width)
        self.proj_out = nn.Linear(width, in_dim)

    def reset_parameters(self) -> None:
        """Zero output layer and final-norm gain, as the flow blocks."""
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.final_norm.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None, rope: Rope | None, frames: int) -> torch.Tensor:
        """Predict the scaled score.

        Args:
            x: ``(B, T*F, D)`` noisy tokens in raster order (frame, row, column).
            y: ``(B, L, txt_dim)`` text embeddings (used if conditional).
            rope: RoPE rotation table ``(L + T*F, head_dim / 2, 2)`` (text rows first when conditional) or None.
            frames: T.

        Returns:
            ``(B, T*F, D)`` prediction of ``noise_std * dNLL/dx``.

        Raises:
            ValueError: a conditional denoiser without ``y``.
        """
        h = self.proj_in(x.to(self.proj_in.weight.dtype))  # sampling passes float32 latents to bf16 weights
        txt_len = 0
        if self.proj_txt is not None:
            if y is None:
                raise ValueError("the conditional denoiser needs y (B, L, txt_dim)")
            h = torch.cat([self.proj_txt(y.to(h.dtype)), h], dim=1)
            txt_len = y.shape[1]
        mask = denoiser_mask(txt_len, frames, x.shape[1] // frames, self.block_causal, self.window, x.device)
        for layer in self.attn_blocks:
            h = layer(h, rope, mask)
        return self.proj_out(self.final_norm(h[:, txt_len:]))
