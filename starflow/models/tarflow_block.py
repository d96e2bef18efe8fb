"""One affine autoregressive flow block (TARFlow, arXiv 2412.06329, Eq. 3-5; STARFlow, arXiv 2506.06276, Sec. 3).

A causal transformer reads ``[sos, x_0 .. x_{N-2}]`` (optionally behind a text prefix) and predicts, for
every token ``x_t``, a scale ``a_t`` and shift ``b_t`` from the tokens before it. The data -> noise map is
``z_t = (x_t - b_t) / a_t`` with log-determinant ``-log a_t`` per element; sampling inverts it token by token,
``x_t = z_t * a_t + b_t`` (SPEC sections 4 and 8).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from starflow.models.kv_cache import KVCache
from starflow.models.layers import AttentionBlock, RMSNorm, Rope, cached_chunk_mask, call_module

__all__ = ["FlowBlock", "IdentityBlock", "SOFTPLUS_ONE", "gathered"]

SOFTPLUS_ONE = math.log(math.e - 1.0)  # 0.541324854612918: softplus(0 + SOFTPLUS_ONE) = 1


class FlowBlock(nn.Module):
    """Affine autoregressive flow block over tokens ``(B, N, D)``.

    Args:
        in_dim: token width D (``patch_size**2 * channels``).
        width: transformer width W.
        num_layers: transformer layers.
        head_dim: attention head width.
        txt_dim: text embedding width when this block is text-conditioned, else None.
        sos: feed a learned start token (else the outputs are shifted right by one).
        use_softplus: ``a = softplus(o_a + 0.5413)`` instead of ``exp(o_a)``.
        use_final_norm: RMSNorm before ``proj_out``.
        soft_clip: ``o = s * tanh(o / s)`` when > 0.
    """

    def __init__(self, in_dim: int, width: int, num_layers: int, head_dim: int, txt_dim: int | None,
                 sos: bool, use_softplus: bool, use_final_norm: bool, soft_clip: float) -> None:
        super().__init__()
        self.in_dim, self.width, self.head_dim = in_dim, width, head_dim
        self.sos, self.use_softplus, self.soft_clip = sos, use_softplus, soft_clip
        self.sos_embed = nn.Parameter(torch.randn(1, 1, in_dim))
        self.proj_in = nn.Linear(in_dim, width)
        self.proj_txt = nn.Linear(txt_dim, width) if txt_dim else None
        self.attn_blocks = nn.ModuleList(AttentionBlock(width, head_dim) for _ in range(num_layers))
        self.final_norm = RMSNorm(width) if use_final_norm else None
        self.proj_out = nn.Linear(width, 2 * in_dim)
        nn.init.zeros_(self.proj_out.weight)

    @property
    def text_conditioned(self) -> bool:
        """Whether the block attends to text (it has ``proj_txt``)."""
        return self.proj_txt is not None

    @property
    def heads(self) -> int:
        """Attention heads: width / head_dim."""
        return self.width // self.head_dim

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> KVCache:
        """A KV cache for ``batch`` rows and ``max_len`` positions (text + tokens)."""
        return KVCache(len(self.attn_blocks), batch, self.heads, max_len, self.head_dim, dtype, device)

    # ------------------------------------------------------------------ transformer
    def _trunk(self, h: torch.Tensor, rope: Rope | None, mask: torch.Tensor | None,
               cache: KVCache | None, start: int) -> torch.Tensor:
        if cache is not None:  # query j sees cached positions [0, start + j]; one query sees them all (no mask)
            n = h.shape[1]
            cache.check(start, n)
            if n > 1:
                mask = cached_chunk_mask(start, n, cache.max_len, h.dtype, h.device)
        for j, layer in enumerate(self.attn_blocks):
            h = layer(h, rope, mask, cache=None if cache is None else cache.layer(j), start=start)
        if cache is not None:
            cache.commit(start + h.shape[1])
        return h

    def _head(self, h: torch.Tensor, direct: bool = False) -> torch.Tensor:
        """Hidden ``(B, n, W)`` -> raw output ``o (B, n, 2D)`` (final norm, proj_out, soft clip); ``direct``: the
        sub-modules without ``nn.Module.__call__`` (KV-cached decoding, see
        :func:`starflow.models.layers.call_module`)."""
        if self.final_norm is not None:
            h = call_module(self.final_norm, h, direct)
        o = call_module(self.proj_out, h, direct)
        if self.soft_clip > 0:
            o = self.soft_clip * torch.tanh(o / self.soft_clip)
        return o

    def scale_shift(self, o: torch.Tensor, log: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Split ``o (..., 2D)`` into float32 scale ``a``, shift ``b`` and ``log a`` (each ``(..., D)``; ``log a`` is
        None with ``log=False``, as sampling does not need it)."""
        o = o if o.dtype == torch.float32 else o.float()
        o_a, b = o[..., : self.in_dim], o[..., self.in_dim :]
        if self.use_softplus:
            a = F.softplus(o_a + SOFTPLUS_ONE)
            return a, b, torch.log(a) if log else None
        return torch.exp(o_a), b, o_a

    # ------------------------------------------------------------------ data -> noise
    def forward(self, x: torch.Tensor, y: torch.Tensor | None, rope: Rope | None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Map permuted tokens to noise (training direction).

        Args:
            x: ``(B, N, D)`` tokens, already in this block's order.
            y: ``(B, L, txt_dim)`` text embeddings if text-conditioned, else ignored.
            rope: RoPE rotation table ``(L + N, head_dim / 2, 2)`` or None.
            mask: optional boolean ``(L + N, L + N)`` attention mask (None = causal).

        Returns:
            ``z (B, N, D)`` in x's dtype promoted to float32, ``logdet (B, N, D)`` float32 (nats, ``-log a``),
            and the raw block output ``o (B, N, 2D)``.

        Raises:
            ValueError: a text-conditioned block without ``y``.
        """
        inp = torch.cat([self.sos_embed.expand(x.shape[0], -1, -1).to(x.dtype), x[:, :-1]], 1) if self.sos else x
        h = self.proj_in(inp.to(self.proj_in.weight.dtype))  # (B, N, W)
        txt_len = 0
        if self.text_conditioned:
            if y is None:
                raise ValueError("this flow block is text-conditioned: pass y (B, L, txt_dim)")
            h = torch.cat([self.proj_txt(y.to(h.dtype)), h], dim=1)  # (B, L + N, W)
            txt_len = y.shape[1]
        o = self._head(self._trunk(h, rope, mask, None, 0)[:, txt_len:])
        if not self.sos:
            o = torch.cat([torch.zeros_like(o[:, :1]), o[:, :-1]], dim=1)
        a, b, log_a = self.scale_shift(o)
        z = (x.float() - b) / a
        return z, -log_a, o

    # ------------------------------------------------------------------ noise -> data (KV-cached steps)
    def prefill_text(self, y: torch.Tensor, rope: Rope | None, cache: KVCache) -> None:
        """Encode the text prefix ``y (B, L, txt_dim)`` into positions ``[0, L)`` of ``cache``.

        ``rope`` is the whole sequence's rotation table; its first ``L`` rows are used.
        """
        txt_len = y.shape[1]
        rope = None if rope is None else rope[:txt_len]
        self._trunk(self.proj_txt(y.to(self.proj_in.weight.dtype)), rope, None, cache, 0)

    def chunk_params(self, prev: torch.Tensor, start: int, txt_len: int, rope_table: Rope | None,
                     cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and shift of tokens ``[start, start + k)`` given the tokens before each of them.

        Args:
            prev: ``(B, k, D)`` inputs ``[x_{start-1} .. x_{start+k-2}]``; at ``start = 0`` the first row
                entry is ignored (the block uses its SOS token or, without SOS, unit scale and zero shift).
            start: first token position (excluding the text prefix).
            txt_len: text tokens in the cache (0 if not text-conditioned).
            rope_table: RoPE rotation table ``(L + N, head_dim / 2, 2)`` of the whole sequence, or None.
            cache: this block's KV cache, holding positions ``[0, txt_len + start)`` (minus one without SOS).

        Returns:
            ``a, b``: float32 ``(B, k, D)``.
        """
        inp = prev
        if start == 0 and self.sos:
            inp = torch.cat([self.sos_embed.expand(prev.shape[0], -1, -1).to(prev.dtype), prev[:, 1:]], 1)
        pos = txt_len + start - (0 if self.sos else 1)
        lead = None
        if not self.sos and start == 0:  # x_0 has unit scale and zero shift
            inp, pos = inp[:, 1:], txt_len
            lead = torch.zeros(prev.shape[0], 1, 2 * self.in_dim, device=prev.device, dtype=torch.float32)
        if inp.shape[1] == 0:
            o = lead
        else:
            rope = None if rope_table is None else rope_table[pos : pos + inp.shape[1]]
            o = self._head(self._trunk(call_module(self.proj_in, inp, True), rope, None, cache, pos), direct=True)
            o = o if lead is None else torch.cat([lead, o.float()], dim=1)
        a, b, _ = self.scale_shift(o, log=False)
        return a, b


class IdentityBlock(nn.Module):
    """A shallow block with 0 layers: the identity, with no parameters and zero log-determinant."""

    text_conditioned = False

    def forward(self, x: torch.Tensor, y: torch.Tensor | None, rope: Rope | None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x (B, N, D)`` -> ``(x, zeros, zeros)``: ``z`` float32, log-determinant float32 and raw output."""
        return x.float(), torch.zeros_like(x, dtype=torch.float32), torch.zeros_like(x)


@contextmanager
def gathered(module: nn.Module) -> Iterator[nn.Module]:
    """Gather an FSDP2-sharded module's own parameters for the duration of the block (no-op if not sharded).

    Not recursive: nested FSDP units (the transformer layers) gather themselves when they are called.
    """
    if not hasattr(module, "unshard"):
        yield module
        return
    module.unshard()
    try:
        yield module
    finally:
        module.reshard()
