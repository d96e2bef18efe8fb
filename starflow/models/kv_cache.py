"""Preallocated key/value cache for one flow block.

Sampling a flow block is autoregressive (STARFlow, arXiv 2506.06276, Sec. 3; TARFlow, arXiv 2412.06329,
Eq. 5): each step appends the keys and values of the new tokens. The cache is allocated once for the
whole sequence (text prefix + tokens), written in place, and rewound by moving its length back
(Jacobi iteration re-runs a chunk at the same positions). Caches are passed explicitly to the
modules that read them; modules never own one.
"""
from __future__ import annotations

import torch

__all__ = ["KVCache"]


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
    """

    def __init__(self, num_layers: int, batch: int, heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (num_layers, batch, heads, max_len, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v (B, heads, n, head_dim)`` at positions ``[start, start + n)`` of ``layer``.

        Returns:
            Views of the keys and values at positions ``[0, start + n)``.

        Raises:
            ValueError: the write would leave a gap or overflow the cache.
        """
        end = start + k.shape[2]
        if start > self.length or end > self.max_len:
            raise ValueError(f"KV cache write [{start}, {end}) invalid (length {self.length}, size {self.max_len})")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def commit(self, end: int) -> None:
        """Mark positions ``[0, end)`` valid (after every layer wrote them)."""
        self.length = end

    def rewind(self, length: int) -> None:
        """Forget positions ``[length, ...)``; later writes overwrite them in place."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind KV cache of length {self.length} to {length}")
        self.length = length

    def reset(self) -> None:
        self.length = 0
