"""Inverting one flow block: sequential decoding and block-wise Jacobi iteration with a KV cache.

Sequential decoding computes ``x_t = z_t * a_t + b_t`` one token at a time (TARFlow, arXiv 2412.06329,
Eq. 5). Block-wise Jacobi iteration (STARFlow-V, arXiv 2511.20462, Sec. 4; SPEC section 9) guesses a chunk
of ``k`` tokens, evaluates the block once on the whole chunk, updates the guess, and repeats until the
relative change ``mean((x_new - x_old)^2) / mean(x_new^2)`` falls below ``jacobi_th``; its fixed point
is the sequential result and ``k`` iterations reach it exactly. Under the ``"batch"`` rule the chunk's final
prefix (every token up to the first one that still changed in any row) is not evaluated again: later iterations
run only on the rest, after its cached keys and values.

Two stopping rules: ``"batch"`` (the official one: the change is measured over the whole batch, so a
sample's result depends on the batch it is in) and ``"sample"`` (each sample stops on its own change and
is then frozen, so its result does not depend on the other samples, the batch size or the number of
ranks; the loop runs until every sample, on every rank when a ``rank_sync`` is given, has stopped).

No ``torch.distributed`` here: code that shards the weights passes ``rank_sync``, a function that reduces
a flag over the ranks (:func:`starflow.distributed.any_rank`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from starflow.models.guidance import guide, guidance_weights

__all__ = ["JacobiSettings", "DecodeStats", "RankSync", "decode_block", "chunk_bounds", "auto_block_size",
           "JACOBI_BLOCK_SIZE", "JACOBI_THRESHOLD", "JACOBI_MAX_ITER", "AUTO", "CPU_TOKEN_ROWS"]

JACOBI_BLOCK_SIZE = 64  # tokens per chunk; the official scripts use 16 (images) and 32 (video)
JACOBI_THRESHOLD = 1e-4  # relative squared change; the official scripts use 1e-3
JACOBI_MAX_ITER = 32  # model evaluations per chunk at most (the official default)

AUTO = "auto"  # block size chosen per block from its rows and the device (auto_block_size)
CPU_TOKEN_ROWS = 256  # on CPU a Jacobi pass of more token-rows than this is slower than sequential decoding
AUTO_MIN_BLOCK = 32  # below this the CPU decodes sequentially (measured with benchmarks/sampling.py)

RankSync = Callable[[torch.Tensor], torch.Tensor]
"""``flag (int32 scalar) -> its maximum over all ranks`` (a collective every rank must call equally often)."""


@dataclass
class JacobiSettings:
    """How to invert a block.

    Attributes:
        enabled: block-wise Jacobi iteration (else sequential, one token per model evaluation).
        block_size: tokens per chunk k, or ``"auto"`` (:func:`auto_block_size` per block).
        threshold: stop when the relative squared change is below this.
        max_iter: at most this many model evaluations per chunk.
        stop: ``"batch"`` (official: relative change over the whole batch) or ``"sample"`` (per sample,
            converged samples frozen: results independent of batch composition).
        rank_sync: with ``stop="sample"`` over several ranks, reduces the "still iterating" flag over them so
            every rank iterates until all are done and all evaluate the model equally often (needed when the
            weights are sharded); None: this process decides alone.
        auto_scale: with ``block_size="auto"``, the decoded rows are multiplied by this before
            :func:`auto_block_size` chooses: :meth:`~starflow.models.STARFlow.reverse` sets it to
            ``jacobi_auto_batch / B`` so that every batch of a job (a smaller last one included) decodes with the
            block size of the job's full batch.
    """

    enabled: bool = False
    block_size: int | str = JACOBI_BLOCK_SIZE
    threshold: float = JACOBI_THRESHOLD
    max_iter: int = JACOBI_MAX_ITER
    stop: str = "batch"
    rank_sync: RankSync | None = None
    auto_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.stop not in STOP_RULES:
            raise ValueError(f"Jacobi stopping rule {self.stop!r} is not one of {STOP_RULES}")
        if self.block_size != AUTO and not (isinstance(self.block_size, int) and self.block_size >= 1):
            raise ValueError(f"Jacobi needs block_size >= 1 (tokens) or 'auto', got {self.block_size!r} "
                             "(--jacobi_block_size)")
        if self.max_iter < 1 or self.threshold < 0:
            raise ValueError(f"Jacobi needs block_size >= 1, max_iter >= 1 and threshold >= 0, got {self.block_size}, "
                             f"{self.max_iter} and {self.threshold} (--jacobi_block_size, --jacobi_th)")


@dataclass
class DecodeStats:
    """Counts from one decode: sequential model evaluations of the block, and the token positions they evaluated
    (per row; sequential decoding evaluates one per evaluation, a Jacobi iteration its chunk or unfinished rest)."""

    evaluations: int = 0
    tokens: int = 0


def auto_block_size(rows: int, device: torch.device) -> int:
    """The Jacobi chunk of ``--jacobi_block_size auto`` for ``rows`` decoded rows (batch x 2 with guidance; x frames
    in frame-local video blocks); 1 means sequential decoding.

    On a GPU a chunk costs about what one token costs: :data:`JACOBI_BLOCK_SIZE`. On the CPU a pass costs its
    token-rows, and a Jacobi chunk needs several passes: the largest power of two ``k <= 64`` with
    ``rows * k <= 256`` (:data:`CPU_TOKEN_ROWS`), or sequential decoding below ``k = 32``. With the shipped demo on
    2 cores this picks 64 for batch 1 and 2, 32 for batch 4 and sequential from batch 8 with guidance
    (``benchmarks/sampling.py``). The block size then depends on the batch, so a sample is no longer
    bit-identical across batch sizes (it is for a fixed block size); :attr:`JacobiSettings.auto_scale` makes every
    batch of a job choose for the job's batch size.
    """
    if device.type != "cpu":
        return JACOBI_BLOCK_SIZE
    k = JACOBI_BLOCK_SIZE
    while k > 1 and rows * k > CPU_TOKEN_ROWS:
        k //= 2
    return k if k >= AUTO_MIN_BLOCK else 1


def chunk_bounds(n: int, block_size: int, frame_tokens: int | None, start: int = 0) -> list[tuple[int, int]]:
    """Chunks ``[s, e)`` covering tokens ``[start, n)``: ``block_size`` long, and ``4 * block_size`` long once they
    start after the first frame of a video (``s > F``, SPEC section 9); the last chunk is cut at ``n``."""
    bounds, s = [], start
    while s < n:
        k = block_size * VIDEO_CHUNK_FACTOR if frame_tokens and s > frame_tokens else block_size
        bounds.append((s, min(s + k, n)))
        s += k
    return bounds


VIDEO_CHUNK_FACTOR = 4
STOP_RULES = ("batch", "sample")


def _any_active(active: torch.Tensor, rank_sync: RankSync | None) -> bool:
    """Whether any row (on any rank with ``rank_sync``) still iterates; the one host sync per iteration."""
    flag = active.any().to(torch.int32)
    if rank_sync is not None:
        flag = rank_sync(flag)
    return bool(flag.item())


def _merge_known_runs(bounds: list[tuple[int, int]], all_known: list[bool]) -> list[tuple[int, int]]:
    """Cut chunks where tokens switch between known (in every row) and not, and join consecutive known pieces
    into one chunk: a known run needs one evaluation (its values are given; only its keys and values are new)."""
    merged: list[tuple[int, int]] = []
    for s, e in bounds:
        start = s
        for t in range(s + 1, e + 1):
            if t < e and all_known[t] == all_known[start]:
                continue
            if all_known[start] and merged and all_known[merged[-1][0]]:
                merged[-1] = (merged[-1][0], t)  # pieces are uniform, so the previous one is wholly known
            else:
                merged.append((start, t))
            start = t
    return merged


def _first_change(x_new: torch.Tensor, x_old: torch.Tensor) -> torch.Tensor:
    """Index of the first token of a chunk whose value changed in any row (``k`` when none did), on the device.

    Tokens up to and including it are final after the iteration: every earlier token kept its value, so the inputs
    of those tokens were already the ones they will always see, and evaluating them again gives the same values
    (the Jacobi fixed point)."""
    changed = (x_new != x_old).flatten(2).any(2).any(0)  # (k,) per token, over rows and features
    k = changed.numel()
    return torch.where(changed.any(), changed.to(torch.int8).argmax(), k)


def decode_block(block, z: torch.Tensor, y: torch.Tensor | None, rope_table, *, guidance: float,
                 jacobi: JacobiSettings, anneal_guidance: bool = False, cache=None,
                 stats: DecodeStats | None = None, frame_tokens: int | None = None,
                 prefix: torch.Tensor | None = None, known: torch.Tensor | None = None,
                 known_mask: torch.Tensor | None = None, attn_temp: float = 1.0) -> torch.Tensor:
    """Invert ``block`` on ``z`` (noise -> data), token by token or chunk by chunk.

    Args:
        block: a :class:`~starflow.models.tarflow_block.FlowBlock`.
        z: ``(R, N, D)`` block-order noise; with guidance ``R = 2B`` and rows ``[:B]`` equal rows ``[B:]``.
        y: ``(R, L, txt_dim)`` text (``[cond; uncond]`` with guidance) or None.
        rope_table: RoPE rotation table ``(L + N, head_dim / 2, 2)`` or None.
        guidance: weight w; > 0 combines the halves (SPEC section 8).
        jacobi: sequential or Jacobi settings.
        anneal_guidance: use ``w (t + 1) / N`` at token t.
        cache: a KV cache to continue (e.g. filled with an image-to-video prefix); None = a new one.
        stats: optional counters, incremented with the number of block evaluations.
        frame_tokens: tokens per frame F when the sequence spans several video frames: Jacobi chunks after
            the first frame are 4x longer and their first iteration reads the window one frame back (not a chunk
            evaluated once: a one-token chunk or a known one reads its decoded inputs).
        prefix: ``(R, P, D)`` known first tokens (image-to-video or a sliding-window context, in block
            order): written to the KV cache in one pass, copied to the output, and decoding starts at ``P``.
        known: ``(R, N, D)`` known inputs of this block (inpainting, SPEC section 17), in block order, used where
            ``known_mask`` is True: a known token's decoded value is replaced by its known value (teacher
            forcing), so every later token attends to the known data. Known tokens start as their exact value
            (not the noise); a chunk known in every row is evaluated once, only to fill the KV cache.
        known_mask: ``(R, N, 1)`` bool, True where ``known`` holds (required with ``known``).
        attn_temp: attention temperature ``T`` of the unconditional guidance rows: their attention logits are
            divided by ``T`` in every layer (text prefix included), as the unconditional branch of TARFlow's
            guidance; 1 = plain guidance. Only acts with guidance.

    Returns:
        ``x (R, N, D)`` float32 data tokens in block order.

    Raises:
        ValueError: ``attn_temp <= 0``; ``known`` of another shape or without ``known_mask``.
    """
    rows, n, _ = z.shape
    if not attn_temp > 0:
        raise ValueError(f"attention temperature must be > 0, got {attn_temp}")
    txt_len = y.shape[1] if block.text_conditioned else 0
    guided = guidance > 0 and block.text_conditioned
    new_cache = cache is None
    if new_cache:
        cache = block.new_cache(rows, txt_len + n, block.proj_in.weight.dtype, z.device)
    if guided and attn_temp != 1.0:  # rows [B:] are the unconditional ones
        scale = torch.ones(rows, 1, 1, 1, device=z.device)
        scale[rows // 2 :] = 1.0 / attn_temp
        cache.query_scale = scale
    if new_cache and txt_len:
        block.prefill_text(y, rope_table, cache)
    zf = z.float()
    # x holds the decoded tokens before the current chunk and the current guess (the noise) after it: the
    # first iteration of a long video chunk reads one frame back, which can reach past the chunk's start
    x = zf.clone()
    forced = known is not None
    if forced:
        if known_mask is None or known.shape != z.shape or known_mask.shape != (rows, n, 1):
            raise ValueError(f"known {tuple(known.shape)} needs the noise's shape {tuple(z.shape)} and known_mask "
                             f"(R, N, 1) = {(rows, n, 1)}, got {None if known_mask is None else tuple(known_mask.shape)}")
        known_values = known.float()
        x = torch.where(known_mask, known_values, x)  # known tokens start at their exact value
        all_known = known_mask.all(0).flatten().tolist()  # tokens known in every row
    n_prefix = 0 if prefix is None else prefix.shape[1]
    if n_prefix:  # the prefix's keys and values, in one pass (its scale and shift are not needed)
        x[:, :n_prefix] = prefix.float()
        prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, : n_prefix - 1]], dim=1).to(block.proj_in.weight.dtype)
        block.chunk_params(prev, 0, txt_len, rope_table, cache)
        if stats is not None:
            stats.evaluations += 1
            stats.tokens += n_prefix
    block_size = (auto_block_size(max(1, round(rows * jacobi.auto_scale)), z.device) if jacobi.block_size == AUTO
                  else jacobi.block_size)
    enabled = jacobi.enabled and (block_size > 1 or jacobi.block_size != AUTO)
    bounds = (chunk_bounds(n, block_size, frame_tokens, n_prefix) if enabled
              else [(t, t + 1) for t in range(n_prefix, n)])
    if forced:
        bounds = _merge_known_runs(bounds, all_known)
    per_sample = jacobi.stop == "sample"
    for s, e in bounds:
        x_chunk = x[:, s:e]  # initial guess: the noise (the exact value at known tokens)
        base = cache.length
        w = guidance_weights(guidance, s, e, n, anneal_guidance, z.device) if guided else 0.0
        fully_known = forced and all(all_known[s:e])
        once = e - s == 1 or fully_known
        max_iter = 1 if once else jacobi.max_iter
        # a chunk evaluated once by its nature (one token, or known) must read the decoded inputs: a frame-back
        # guess would stay in the output and in the KV cache with nothing to correct it
        frame_back = enabled and frame_tokens is not None and s > frame_tokens and not once
        active = torch.ones(rows, 1, 1, dtype=torch.bool, device=z.device) if max_iter > 1 else None
        frozen_prev = None  # per-sample rule: the inputs at which each stopped sample converged
        done_to = 0  # tokens [s, s + done_to) are final: their inputs no longer change, so they are not re-evaluated
        for it in range(max_iter):
            if it == 0 and frame_back:  # first guess of the inputs: the same window one frame back
                prev = x[:, s - 1 - frame_tokens : e - 1 - frame_tokens]
            else:
                first = x[:, s - 1 : s] if s > 0 else torch.zeros_like(x_chunk[:, :1])
                prev = torch.cat([first, x_chunk[:, :-1]], dim=1)  # (a new contiguous tensor)
            if prev.dtype != block.proj_in.weight.dtype:
                prev = prev.to(block.proj_in.weight.dtype)
            if frozen_prev is not None:  # stopped samples see (and cache) exactly their converged inputs
                prev = torch.where(active, prev, frozen_prev)
            o = done_to
            a, b = block.chunk_params(prev[:, o:], s + o, txt_len, rope_table, cache)
            if guided:
                a, b = guide(a, b, w if isinstance(w, float) or o == 0 else w[o:])
            x_new = b + a * zf[:, s + o : e]
            if forced:  # teacher forcing: known tokens keep their known value
                x_new = torch.where(known_mask[:, s + o : e], known_values[:, s + o : e], x_new)
            if o:
                x_new = torch.cat([x_chunk[:, :o], x_new], dim=1)
            if stats is not None:
                stats.evaluations += 1
                stats.tokens += e - s - o
            if max_iter == 1:
                x_chunk = x_new
                break
            if per_sample:
                x_new = torch.where(active, x_new, x_chunk)
                change = (x_new - x_chunk).square().mean((1, 2)) / x_new.square().mean((1, 2))
                done = active & (change < jacobi.threshold)[:, None, None]
                frozen_prev = prev if frozen_prev is None else torch.where(done, prev, frozen_prev)
                active = active & ~done
                stop = it == max_iter - 1 or not _any_active(active, jacobi.rank_sync)
            elif it == max_iter - 1:
                stop = True
            else:
                change = (x_new - x_chunk).square().mean() / x_new.square().mean()
                # the final prefix is shared by the rows, so it is skipped only under the batch rule: with the
                # per-sample rule a sample's evaluations must not depend on its batch (bit-identical in any batch);
                # a frame-back pass read other inputs. Change and prefix reach the host in one sync.
                if it == 0 and frame_back:
                    stop = change.item() < jacobi.threshold
                else:
                    first = _first_change(x_new, x_chunk).to(change.dtype)
                    change_value, first_value = torch.stack([change, first]).tolist()
                    stop = change_value < jacobi.threshold
                    done_to = min(int(first_value) + 1, e - s)
            x_chunk = x_new
            if stop or done_to == e - s:
                break
            cache.rewind(base + done_to)  # keep the keys and values of the final prefix
        x[:, s:e] = x_chunk
    return x
