"""Preallocated key/value cache for one flow block.

Sampling a flow block is autoregressive (STARFlow, arXiv 2506.06276, Sec. 3; TARFlow, arXiv 2412.06329,
Eq. 5): each step appends the keys and values of the new tokens. The cache is allocated once for the
whole sequence (text prefix + tokens), written in place, and rewound by moving its length back
(Jacobi iteration re-runs a chunk at the same positions). Caches are passed explicitly to the
modules that read them; modules never own one.
"""
from __future__ import annotations

import torch

__all__ = ["KVCache", "LayerCache"]


class KVCache:
    """Keys and values of every layer of one flow block.

    Args:
        num_layers: transformer layers of the block.
        batch: rows B (2B when guidance rows are batched).
        heads: attention heads.
        max_len: longest sequence S it will hold (text tokens + image tokens).
        head_dim: per-head width.
        dtype, device: storage of the buffers.

    Attributes:
        k, v: ``(num_layers, B, heads, S, head_dim)`` buffers.
        length: number of valid positions (``[0, length)``).
        query_scale: None, or ``(B, 1, 1, 1)`` factors multiplying each row's queries in every layer that uses this
            cache: ``1 / T`` divides that row's attention logits by a temperature ``T`` (attention-temperature
            guidance, ``starflow sample --attn_temp``; set by :func:`starflow.models.jacobi.decode_block`).
    """

    def __init__(self, num_layers: int, batch: int, heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (num_layers, batch, heads, max_len, head_dim)
        # zeros, not empty: positions are only read once written, but a stray NaN in memory read by a
        # masked-out key would still poison the weighted sum
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0
        self._layers = [LayerCache(self.k[j], self.v[j]) for j in range(num_layers)]  # views, made once
        self._query_scale: torch.Tensor | None = None

    @property
    def query_scale(self) -> torch.Tensor | None:
        """``(B, 1, 1, 1)`` per-row query factors of every layer, or None (see the class docstring)."""
        return self._query_scale

    @query_scale.setter
    def query_scale(self, scale: torch.Tensor | None) -> None:
        """Set the factors (or None) for every layer's cache view at once."""
        self._query_scale = scale
        for layer in self._layers:
            layer.query_scale = scale

    @property
    def max_len(self) -> int:
        """Positions the cache holds at most."""
        return self.k.shape[3]

    def check(self, start: int, n: int) -> None:
        """Validate a write of ``n`` positions at ``start`` (once per chunk, before the layers write their
        :meth:`layer` views).

        Raises:
            ValueError: the write would leave a gap or overflow the cache.
        """
        end = start + n
        if start > self.length or end > self.max_len:
            raise ValueError(f"KV cache write [{start}, {end}) invalid (length {self.length}, size {self.max_len})")

    def layer(self, j: int) -> "LayerCache":
        """The buffers of layer ``j`` (views, no copy)."""
        return self._layers[j]

    def commit(self, end: int) -> None:
        """Mark positions ``[0, end)`` valid (after every layer wrote them)."""
        self.length = end

    def rewind(self, length: int) -> None:
        """Forget positions ``[length, ...)``; later writes overwrite them in place.

        Raises:
            ValueError: ``length`` outside ``[0, self.length]``.
        """
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind KV cache of length {self.length} to {length}")
        self.length = length

    def reset(self) -> None:
        """Forget every position (the buffers are kept and overwritten by later writes)."""
        self.length = 0


class LayerCache:
    """One layer's slice of a :class:`KVCache`: what a transformer layer reads and writes.

    It carries no position bookkeeping (validated once per chunk by :meth:`KVCache.check`), so a compiled
    layer sees only tensors and the symbolic start position and length.

    Attributes:
        k, v: ``(B, heads, S, head_dim)`` views of the cache's buffers.
        query_scale: None or ``(B, 1, 1, 1)`` per-row query factors (see :class:`KVCache`).
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, query_scale: torch.Tensor | None = None) -> None:
        self.k, self.v, self.query_scale = k, v, query_scale

    def write(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v (B, heads, n, head_dim)`` at ``[start, start + n)``; returns the keys and values of positions
        ``[0, start + n)`` (views ``(B, heads, start + n, head_dim)``: attention never reads the positions not yet
        written)."""
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]
