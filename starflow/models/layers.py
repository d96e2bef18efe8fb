"""Transformer parts of a STARFlow flow block: RMSNorm, attention with a KV-cache hook, MLP.

Attribute names (``attention.norm``, ``attention.qkv``, ``attention.proj``, ``mlp.norm``, ``mlp.main``)
are those of the released checkpoints (SPEC section 3). Activation checkpointing is per layer and per
sub-layer (:func:`set_activation_checkpointing`, config keys ``gradient_checkpoint`` and
``gradient_checkpoint_mlp``).
"""
from __future__ import annotations

import functools
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from starflow.models.kv_cache import LayerCache
from starflow.models.rope import apply_rope, rotate_pairs

__all__ = ["RMSNorm", "call_module", "attend", "causal_self_attention_in_chunks", "causal_chunk_edges",
           "cached_chunk_mask", "attend_cached", "Attention", "MLP", "gelu_without_onednn", "AttentionBlock", "Rope",
           "set_activation_checkpointing"]

LAYER_NORM_EPS = 1e-5
RMS_NORM_EPS = 1e-6

Rope = torch.Tensor  # (cos, sin), (S, head_dim / 2, 2) float32 for the positions in use (rope.rope_rotation)


class RMSNorm(nn.Module):
    """RMSNorm in float32 with a zero-initialised gain: ``x / sqrt(mean(x^2) + 1e-6) * (1 + weight)``.

    Args:
        dim: feature width W. Input ``(..., W)``; output has the input dtype.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``(..., W)`` over its last axis; returns the same shape and dtype."""
        f32 = x.dtype == torch.float32  # (no cast calls in float32: each is a dispatch in the decoding loop)
        xf = x if f32 else x.float()
        weight = self.weight if self.weight.dtype == torch.float32 else self.weight.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + RMS_NORM_EPS) * (1 + weight)
        return out if f32 else out.to(x.dtype)


def call_module(module: nn.Module, x: torch.Tensor, direct: bool) -> torch.Tensor:
    """``module(x)``, or with ``direct`` its ``forward(x)``: KV-cached decoding calls the sub-modules of a layer this
    way, as ``nn.Module.__call__`` costs ~3 us a call on a CPU, a sixth of a one-token step of a small layer. No hook
    is skipped that matters: FSDP2 and ``torch.compile`` wrap whole layers and flow blocks, which are still called,
    and peft's LoRA layers apply their adapters in their ``forward``."""
    return module.forward(x) if direct else module(x)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           is_causal: bool) -> torch.Tensor:
    """Scaled dot-product attention ``softmax(q k^T / sqrt(head_dim)) v`` through ``F.scaled_dot_product_attention``
    (its flash, cuDNN or memory-efficient kernels). (The causal self-attention of training on a CPU takes
    :func:`causal_self_attention_in_chunks` instead, from the fused ``qkv`` projection: see :meth:`Attention.forward`.)

    Args:
        q: ``(B, heads, n, head_dim)``; k, v: ``(B, heads, S, head_dim)``.
        mask: boolean ``(n, S)`` (True = attend) or None.
        is_causal: causal attention (``mask`` must be None).

    Returns:
        ``(B, heads, n, head_dim)`` in ``q``'s dtype. On a CPU, bf16 inputs, and any inputs under CPU autocast, are
        attended in float32: at training shapes the CPU flash kernel is faster in float32 than in bf16 (forward +
        backward of the ``benchmarks/train_step.py`` attention: 19.7 ms float32, 27.3 ms bf16), and no less
        accurate. (KV-cached decoding does not come here: casting the whole cache per call would cost more.)
    """
    if q.device.type == "cpu" and (q.dtype == torch.bfloat16 or torch.is_autocast_enabled("cpu")):
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=is_causal)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)


CAUSAL_CHUNK = 140  # query positions per chunk of causal_self_attention_in_chunks
CHUNKED_PROBABILITIES_MAX_BYTES = 64 * 2**20  # the attention probabilities one call keeps for its backward pass
CHUNKED_MAX_LEN = 2048  # longest sequence for the chunks (its cached (n, n) bias: 16 MiB in float32)


def _chunks_pay(qkv: torch.Tensor, heads: int) -> bool:
    """Whether the causal self-attention of ``qkv (B, n, 3 W)`` goes through :func:`causal_self_attention_in_chunks`:
    on a CPU, in float32 or float64, when a backward pass follows (the chunks keep their probabilities for it; without
    one the flash kernel is as fast, with no memory), outside ``torch.compile`` and when :func:`causal_chunk_edges`
    finds the probabilities small enough."""
    if (qkv.device.type != "cpu" or qkv.dtype not in (torch.float32, torch.float64) or torch.compiler.is_compiling()
            or not (torch.is_grad_enabled() and qkv.requires_grad)):
        return False  # (compiled, inductor's code for the chunks is slower than the flash kernel: 861 ms a step, 528)
    b, n, _ = qkv.shape
    return causal_chunk_edges(b * heads, n, qkv.element_size()) is not None


def causal_chunk_edges(rows: int, n: int, element_size: int) -> list[int] | None:
    """Query chunk boundaries ``[0, ..., n]`` of :func:`causal_self_attention_in_chunks` for ``rows`` = batch x heads
    sequences of ``n`` positions: ``round(n / CAUSAL_CHUNK)`` chunks (at least one), or None when the probabilities
    the chunks keep for the backward pass (``rows * sum((e - a) * e)`` values of ``element_size`` bytes) would
    exceed ``CHUNKED_PROBABILITIES_MAX_BYTES`` or ``n`` exceeds ``CHUNKED_MAX_LEN`` (:meth:`Attention.forward` then
    takes the flash kernel; the chunks' advantage shrinks as ``n`` grows: 37% at 560 positions, 6-9% at 1024)."""
    if n > CHUNKED_MAX_LEN:
        return None
    edges = _chunk_edges(n)
    kept = rows * sum((e - a) * e for a, e in zip(edges, edges[1:])) * element_size
    return edges if kept <= CHUNKED_PROBABILITIES_MAX_BYTES else None


def _chunk_edges(n: int) -> list[int]:
    chunks = max(1, round(n / CAUSAL_CHUNK))
    return [round(i * n / chunks) for i in range(chunks + 1)]


@functools.lru_cache(maxsize=8)
def _causal_bias(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(n, n)``: 0 on and below the diagonal, -inf above (built once per length, not per step: the training
    lengths of a model's flow blocks and the cache lengths of its sampling, ``n <= CHUNKED_MAX_LEN``)."""
    return torch.full((n, n), float("-inf"), dtype=dtype, device=device).triu(1)


def cached_chunk_mask(start: int, n: int, max_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The attention mask of ``n > 1`` queries at positions ``[start, start + n)`` over a KV cache of ``max_len``
    positions: query ``j`` sees keys ``[0, start + j]``. Shape ``(n, start + n)``.

    On a CPU, in float32 or float64 and for caches of at most ``CHUNKED_MAX_LEN`` positions, an additive mask
    (0 = attend, -inf = not), a view of one cached ``(max_len, max_len)`` table (no tensors built per chunk), which
    :func:`attend_cached` attends with batched matrix products; elsewhere a boolean mask (True = attend) for
    ``F.scaled_dot_product_attention``."""
    if device.type == "cpu" and dtype in (torch.float32, torch.float64) and max_len <= CHUNKED_MAX_LEN:
        return _causal_bias(max_len, dtype, device)[start : start + n, : start + n]
    keys = torch.arange(start + n, device=device)
    return keys[None, :] <= start + torch.arange(n, device=device)[:, None]


def attend_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of KV-cached decoding, in the cache's dtype: ``q (B, heads, n, head_dim)`` over the written
    positions ``k, v (B, heads, S, head_dim)`` with the mask of :func:`cached_chunk_mask` (None for one query).

    An additive mask on a CPU (a Jacobi chunk) is attended as ``softmax(q k^T / sqrt(head_dim) + mask) v`` with two
    batched matrix products, outside ``torch.compile``: at decoding shapes PyTorch's CPU flash kernel spends most of
    its time on the mask (16 rows x 3 heads, 16 queries over 88 keys of 32: 347 us against 149, 2 threads), and the
    two agree to float rounding. Everything else goes to ``F.scaled_dot_product_attention``. Returns
    ``(B, heads, n, head_dim)``."""
    if mask is None or mask.dtype == torch.bool or q.device.type != "cpu" or torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    b, h, n, d = q.shape
    s = k.shape[2]
    scores = torch.baddbmm(mask, q.reshape(b * h, n, d), k.reshape(b * h, s, d).transpose(1, 2), alpha=d ** -0.5)
    if torch.is_grad_enabled() and scores.requires_grad:
        scores = scores.softmax(-1)
    else:
        torch._softmax(scores, -1, False, out=scores)  # in place
    return torch.bmm(scores, v.reshape(b * h, s, d)).view(b, h, n, d)


class _CausalChunks(torch.autograd.Function):
    """Forward and backward of :func:`causal_self_attention_in_chunks`, written out: the gradients of the queries,
    keys and values are formed in one ``(B, n, 3, heads, head_dim)`` tensor, the layout of the fused ``qkv``
    projection, with RoPE's backward rotation applied on the way, and the probabilities are normalised and
    differentiated in place."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, rotation: torch.Tensor | None, heads: int) -> torch.Tensor:
        b, n, width3 = qkv.shape
        d = width3 // 3 // heads
        rows = b * heads
        parts = qkv.view(b, n, 3, heads, d)
        qk = qkv.new_empty(2, b, heads, n, d)  # rotated queries and keys, head-major
        rotate_pairs(parts[:, :, :2].permute(2, 0, 3, 1, 4), rotation, qk)
        q, k = qk.view(2, rows, n, d).unbind(0)
        v = parts[:, :, 2].transpose(1, 2).reshape(rows, n, d)
        bias = _causal_bias(n, qkv.dtype, qkv.device)
        edges = _chunk_edges(n)
        out = qkv.new_empty(b, n, heads, d)
        probs = []
        for a, e in zip(edges, edges[1:]):
            p = torch.baddbmm(bias[a:e, :e], q[:, a:e], k[:, :e].transpose(1, 2), alpha=d ** -0.5)
            torch._softmax(p, -1, False, out=p)  # in place: the scores are not needed again
            out[:, a:e] = torch.bmm(p, v[:, :e]).view(b, heads, e - a, d).transpose(1, 2)
            probs.append(p)
        ctx.save_for_backward(qk, v, rotation, *probs)
        ctx.heads = heads
        return out.view(b, n, heads * d)

    @staticmethod
    @once_differentiable  # (its in-place kernels record no graph: a second derivative is refused, not wrong)
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        qk, v, rotation, *probs = ctx.saved_tensors
        _, b, heads, n, d = qk.shape
        rows, scale = b * heads, d ** -0.5
        q, k = qk.view(2, rows, n, d).unbind(0)
        do = grad_out.reshape(b, n, heads, d).transpose(1, 2).reshape(rows, n, d)
        grad = grad_out.new_empty(b, n, 3, heads, d)  # d qkv
        grad_q, grad_k, grad_v = (grad[:, :, i].transpose(1, 2) for i in range(3))  # (B, heads, n, d) views
        edges = _chunk_edges(n)
        dk = dv = None  # accumulated over the chunks; the last chunk (computed first) covers every key
        for (a, e), p in reversed(list(zip(zip(edges, edges[1:]), probs))):
            dv_chunk = torch.bmm(p.transpose(1, 2), do[:, a:e])  # (rows, e, d)
            dp = torch.bmm(do[:, a:e], v[:, :e].transpose(1, 2))  # (rows, e - a, e)
            ds = torch._softmax_backward_data(dp, p, -1, p.dtype, grad_input=dp)  # in place
            dq_chunk = torch.bmm(ds, k[:, :e])
            rotate_pairs(dq_chunk.view(b, heads, e - a, d), None if rotation is None else rotation[a:e],
                         grad_q[:, :, a:e], inverse=True, scale=scale)
            dk_chunk = torch.bmm(ds.transpose(1, 2), q[:, a:e])
            if dk is None:
                dk, dv = dk_chunk, dv_chunk
            else:
                dk[:, :e] += dk_chunk
                dv[:, :e] += dv_chunk
        rotate_pairs(dk.view(b, heads, n, d), rotation, grad_k, inverse=True, scale=scale)
        grad_v.copy_(dv.view(b, heads, n, d))
        return grad.view(b, n, 3 * heads * d), None, None


def causal_self_attention_in_chunks(qkv: torch.Tensor, rotation: torch.Tensor | None, heads: int) -> torch.Tensor:
    """Causal self-attention of a fused projection, RoPE included, by query chunks, each over the keys it may see:
    the training path of a CPU (:meth:`Attention.forward`). The same values as splitting ``qkv`` into heads,
    :func:`~starflow.models.rope.apply_rope` on queries and keys and causal ``softmax(q k^T / sqrt(head_dim)) v``.

    The queries are split into ``round(n / CAUSAL_CHUNK)`` chunks; chunk ``[a, e)`` attends keys ``[0, e)`` with a
    batched matrix product, an additive -inf bias above the diagonal and a softmax, so ~``(chunks + 1) / (2 chunks)``
    of the full score matrix is computed. The backward pass is written out (``_CausalChunks``): it forms the
    gradient of ``qkv`` in its own layout, RoPE's backward rotation included, where autograd would zero-fill,
    stack, concatenate and copy per chunk and per split. At training shapes this is faster on a CPU than PyTorch's
    flash kernel, forward and backward together, and equal to it up to float rounding (~1e-6 in float32). It keeps
    each chunk's probabilities for the backward pass (``B * heads`` times ``sum((e - a) * e)`` values: ``n^2`` with
    one chunk, ``3/4 n^2`` with two), hence the size limit of :func:`causal_chunk_edges`. Under CPU autocast it
    computes in float32.

    Args:
        qkv: ``(B, n, 3 W)`` the fused projection, ``W = heads * head_dim`` (queries, keys, values; each head-major).
        rotation: RoPE ``(n, head_dim / 2, 2)`` (:func:`~starflow.models.rope.rope_rotation`) or None.
        heads: attention heads.

    Returns:
        ``(B, n, W)`` the attention output with the heads side by side, in ``qkv``'s dtype (float32 under autocast).
    """
    if qkv.device.type == "cpu" and (qkv.dtype == torch.bfloat16 or torch.is_autocast_enabled("cpu")):
        with torch.autocast("cpu", enabled=False):  # (autograd runs the backward pass outside any autocast)
            return causal_self_attention_in_chunks(qkv.float(), rotation, heads)
    if not qkv.is_contiguous() or qkv.storage_offset() % 2:
        qkv = qkv.clone(memory_format=torch.contiguous_format)  # (complex views need adjacent, aligned pairs)
    return _CausalChunks.apply(qkv, rotation, heads)


class Attention(nn.Module):
    """Pre-norm multi-head self-attention with RoPE, a causal or explicit mask, and an optional KV cache.

    Args:
        dim: width W; heads = W // head_dim.
        head_dim: per-head width; softmax scale ``1/sqrt(head_dim)``.
    """

    def __init__(self, dim: int, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.heads = dim // head_dim
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: Rope | None, mask: torch.Tensor | None = None, *,
                cache: LayerCache | None = None, start: int = 0) -> torch.Tensor:
        """Attend.

        Args:
            x: ``(B, n, W)`` hidden states of positions ``[start, start + n)``.
            rope: rotation table ``(n, head_dim / 2, 2)`` for those positions
                (:func:`~starflow.models.rope.rope_rotation`), or None.
            mask: boolean ``(n, S)`` (True = attend) over key positions ``[0, S)``; None = causal. With a cache,
                ``S = start + n`` (the positions written so far, this chunk's included), the mask of
                :func:`cached_chunk_mask` (boolean or additive), None for one query.
            cache: this layer's KV cache, receiving the chunk's keys/values; attention then runs over positions
                ``[0, start + n)`` (see :meth:`starflow.models.tarflow_block.FlowBlock._trunk`, which builds the mask).
            start: position of the first query.

        Returns:
            ``(B, n, W)`` attention output (before the residual).

        Raises:
            ValueError: several queries over a cache without ``mask``.
        """
        b, n, _ = x.shape
        direct = cache is not None  # decoding: the sub-modules without nn.Module.__call__ (see call_module)
        qkv = call_module(self.qkv, call_module(self.norm, x, direct), direct)
        if qkv.device.type == "cpu" and qkv.dtype == torch.bfloat16 and cache is None:
            qkv = qkv.float()  # attention computes in float32 on a CPU: cast once, before RoPE
        if cache is None and mask is None and _chunks_pay(qkv, self.heads):  # training on a CPU
            out = causal_self_attention_in_chunks(qkv, rope, self.heads)
            return self.proj(out if out.dtype == x.dtype else out.to(x.dtype))
        # q, k, v each (B, heads, n, head_dim); queries and keys are rotated in one pass, read in place from qkv.
        # Split in qkv's own layout, not indexed after a permute: the backward pass then writes the three gradients
        # into one (B, n, 3 W) tensor by a single concatenation, where indexing zero-fills a qkv-sized gradient per
        # index, adds them and copies the sum back to that layout (on a CPU the attention of a layer, forward and
        # backward, is ~7% faster; a whole training step of benchmarks/train_step.py 0.5-3%, paired A/B)
        qk, v = qkv.view(b, n, 3, self.heads, self.head_dim).split([2, 1], dim=2)
        qk = qk.permute(2, 0, 3, 1, 4)
        q, k = (qk if rope is None else apply_rope(qk, rope)).unbind(0)
        v = v.squeeze(2).transpose(1, 2)
        if cache is not None:
            if mask is None and n > 1:
                raise ValueError("attention of several queries over a KV cache needs the position mask (n, start + n)")
            k, v = cache.write(k, v, start)
            if cache.query_scale is not None:  # per-row attention temperature (sampling only)
                q = q * cache.query_scale.to(q.dtype)
        if cache is None:
            out = attend(q, k, v, mask, is_causal=mask is None)  # (one query: causal = unmasked)
        else:  # decoding: attention in the cache's dtype (a float32 copy of the whole cache per call costs more)
            out = attend_cached(q, k, v, mask)
        out = out.transpose(1, 2).reshape(b, n, -1)
        return call_module(self.proj, out if out.dtype == x.dtype else out.to(x.dtype), direct)


class MLP(nn.Module):
    """Pre-norm MLP ``W -> 4W -> W`` with exact GELU."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.main = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, direct: bool = False) -> torch.Tensor:
        """``(B, n, W) -> (B, n, W)``; ``direct``: the sub-modules without ``nn.Module.__call__``
        (see :func:`call_module`), and on a CPU one-token steps take :func:`gelu_without_onednn`."""
        fc1, gelu, fc2 = self.main
        h = call_module(fc1, call_module(self.norm, x, direct), direct)
        if direct and h.shape[1] == 1 and h.device.type == "cpu" and not torch.compiler.is_compiling():
            h = gelu_without_onednn(h)
        else:
            h = call_module(gelu, h, direct)
        return call_module(fc2, h, direct)


def gelu_without_onednn(x: torch.Tensor) -> torch.Tensor:
    """Exact GELU of a CPU tensor through ATen's own kernel instead of oneDNN's.

    PyTorch sends a contiguous float32 CPU tensor to oneDNN, which costs ~25 us a call whatever its size: most of the
    GELU of a one-token decoding step (a 2 x 384 input: 27 us, ATen's kernel 6 us; 16 x 384: 28 us and 19 us). On
    chunks and whole sequences oneDNN is the faster one (16 x 16 x 384: 93 us against 128 us), so KV-cached decoding
    uses this for one-token steps only, a rule that does not depend on the batch. Both compute the exact erf GELU;
    they differ by float rounding (up to 2 ulp). The switch (``torch.backends.mkldnn.enabled``) is process-wide for
    the duration of the call, so a GELU another thread runs in that window takes ATen's kernel too (the same values up
    to rounding); it is restored afterwards, also after an error.
    """
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        return F.gelu(x)
    finally:
        torch.backends.mkldnn.enabled = enabled


class AttentionBlock(nn.Module):
    """One transformer layer: ``h = h + Attn(LN(h)); h = h + MLP(LN(h))`` (SPEC section 4, step 3).

    Attributes:
        checkpoint_attention: recompute the attention in the backward pass instead of storing its
            activations (only when training with gradients and without a KV cache).
        checkpoint_mlp: the same for the MLP.
    """

    def __init__(self, dim: int, head_dim: int) -> None:
        super().__init__()
        self.attention = Attention(dim, head_dim)
        self.mlp = MLP(dim)
        self.checkpoint_attention = False
        self.checkpoint_mlp = False

    def forward(self, x: torch.Tensor, rope: Rope | None, mask: torch.Tensor | None = None, *,
                cache: LayerCache | None = None, start: int = 0) -> torch.Tensor:
        """Apply the layer; arguments as :meth:`Attention.forward`. Returns ``(B, n, W)``."""
        recompute = self.training and torch.is_grad_enabled() and cache is None
        if recompute and self.checkpoint_attention:
            x = x + checkpoint(self.attention, x, rope, mask, use_reentrant=False)
        elif cache is not None:  # KV-cached decoding: no nn.Module.__call__ (see call_module)
            x = x + self.attention.forward(x, rope, mask, cache=cache, start=start)
        else:
            x = x + self.attention(x, rope, mask)
        if recompute and self.checkpoint_mlp:
            return x + checkpoint(self.mlp, x, use_reentrant=False)
        return x + (self.mlp(x) if cache is None else self.mlp.forward(x, direct=True))


def set_activation_checkpointing(layers: Iterable[AttentionBlock], attention_every: int, mlp_every: int) -> None:
    """Checkpoint the attention (resp. MLP) of every k-th layer of one transformer stack.

    Layer ``j`` (0-based, within the stack) is checkpointed when ``j % k == 0``: ``k = 1`` every layer,
    ``k = 2`` layers 0, 2, 4, ..., ``k = 0`` none. Checkpointed sub-layers are recomputed in the backward
    pass (``torch.utils.checkpoint``, non-reentrant): less activation memory, the same values and gradients.

    Args:
        layers: the stack's layers in order (e.g. a flow block's ``attn_blocks``).
        attention_every: period k of the attention checkpoints (config ``gradient_checkpoint``).
        mlp_every: period k of the MLP checkpoints (config ``gradient_checkpoint_mlp``).

    Raises:
        ValueError: a period is negative.
    """
    if attention_every < 0 or mlp_every < 0:
        raise ValueError(f"checkpointing periods must be >= 0, got {attention_every} and {mlp_every}")
    for j, layer in enumerate(layers):
        layer.checkpoint_attention = attention_every > 0 and j % attention_every == 0
        layer.checkpoint_mlp = mlp_every > 0 and j % mlp_every == 0
