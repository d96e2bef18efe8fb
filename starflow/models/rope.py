"""Rotary position embedding (RoPE) with 2 or 3 axes, as used by STARFlow / STARFlow-V.

Half of the head width, ``d = head_dim / 2``, holds rotation frequencies. In a model with text,
``d - 8`` of them are spatial (split between rows and columns) and 8 belong to a third axis (the
frame index for video, the text position for text tokens); without text and video all ``d`` are
spatial (SPEC section 6). Angles are repeated twice in place (``a0 a0 a1 a1 ...``) and rotate
adjacent pairs of query/key features.
"""
from __future__ import annotations

import math

import torch

__all__ = ["THIRD_AXIS_DIMS", "rope_angles", "rope_rotation", "apply_rope", "rotate_pairs"]

THIRD_AXIS_DIMS = 8  # frequencies reserved for the frame / text axis
ROPE_BASE = 10000.0


def rope_angles(head_dim: int, grid: tuple[int, int, int], pos_scale: float, txt_len: int = 0,
                three_axis: bool = False) -> torch.Tensor:
    """Rotation angles for a sequence ``[text tokens; frame-major grid tokens]``.

    Args:
        head_dim: attention head width (multiple of 4).
        grid: ``(T, h, w)`` frames and token rows/columns; images have ``T = 1``.
        pos_scale: ``P = pt_seq_len``; a row index ``i`` maps to ``i / sqrt(h*w) * P``.
        txt_len: text tokens ``L`` placed first, at ``(0, 0, k / L * P)`` (needs ``three_axis``: text positions
            live on the third axis).
        three_axis: use the 3-axis form (model with text, or video). Token third coordinates are
            the frame index (0 for images).

    Returns:
        ``(L + T*h*w, head_dim)`` float32 angles in radians, each repeated twice in place.

    Raises:
        ValueError: ``txt_len > 0`` without ``three_axis``.
    """
    if txt_len and not three_axis:
        raise ValueError(f"rope_angles: {txt_len} text tokens need the 3-axis form (three_axis=True), where text "
                         "positions lie on the third axis")
    half = head_dim // 2
    t, h, w = grid
    d_s = half - THIRD_AXIS_DIMS if three_axis else half
    f = ROPE_BASE ** (-2.0 * torch.arange(d_s // 2, dtype=torch.float64) / d_s) if d_s > 0 else torch.zeros(0)
    rows = torch.arange(h, dtype=torch.float64) / math.sqrt(h * w) * pos_scale
    cols = torch.arange(w, dtype=torch.float64) / math.sqrt(h * w) * pos_scale
    px = rows.view(1, h, 1).expand(t, h, w).reshape(-1)  # (T*h*w,)
    py = cols.view(1, 1, w).expand(t, h, w).reshape(-1)
    parts = [px[:, None] * f, py[:, None] * f]
    if three_axis:
        g = ROPE_BASE ** (-torch.arange(THIRD_AXIS_DIMS, dtype=torch.float64) / THIRD_AXIS_DIMS)
        frame = torch.arange(t, dtype=torch.float64).view(t, 1, 1).expand(t, h, w).reshape(-1)
        parts.append(frame[:, None] * g)
    angles = torch.cat(parts, dim=1)  # (T*h*w, half)
    if txt_len:
        txt = torch.zeros(txt_len, half, dtype=torch.float64)
        txt[:, d_s:] = (torch.arange(txt_len, dtype=torch.float64) / txt_len * pos_scale)[:, None] * g
        angles = torch.cat([txt, angles], dim=0)
    return angles.repeat_interleave(2, dim=1).float()


def rope_rotation(angles: torch.Tensor) -> torch.Tensor:
    """The rotation table of :func:`apply_rope`: ``(cos, sin)`` of each distinct angle, ``(S, head_dim / 2, 2)``
    float32 (the layout of ``torch.view_as_real`` of ``cos + i sin``), from :func:`rope_angles` ``(S, head_dim)``
    (each angle repeated twice in place). Real, so that compiled layers take it as an ordinary input."""
    a = angles[..., ::2].float()
    return torch.stack([a.cos(), a.sin()], dim=-1)


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent feature pairs: ``x*cos + rot(x)*sin``, ``rot(x)[2k] = -x[2k+1]``, ``rot(x)[2k+1] = x[2k]``.

    Computed as one complex multiplication per pair, ``(x[2k] + i x[2k+1]) * (cos + i sin)`` (the same products
    and sums, so the same float32 result as the real form, in one kernel forward and backward). Under
    ``torch.compile`` the same products and sums are written out in real arithmetic: inductor generates no code for
    complex operators, and the stride checks of the complex view would split the compiled graph.

    Args:
        x: ``(..., S, head_dim)`` queries and/or keys, e.g. ``(B, heads, S, head_dim)`` or both at once as
            ``(2, B, heads, S, head_dim)``; a strided view (a slice of the fused ``qkv`` projection) is read in
            place, without a copy, when its feature pairs are adjacent.
        rotation: ``(S, head_dim / 2, 2)`` float32 ``(cos, sin)`` from :func:`rope_rotation`, at the positions of
            ``x``.

    Returns:
        The rotated features, contiguous, in ``x``'s shape and dtype.
    """
    x32 = x if x.dtype == torch.float32 else x.float()
    if torch.compiler.is_compiling():
        pairs = x32.unflatten(-1, (-1, 2))
        re, im = pairs[..., 0], pairs[..., 1]
        cos, sin = rotation[..., 0], rotation[..., 1]
        out = torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(-2)
    else:
        if x32.stride(-1) != 1 or x32.storage_offset() % 2 or any(s % 2 for s in x32.stride()[:-1]):
            x32 = x32.contiguous()  # complex views need adjacent (real, imaginary) pairs
        out = rotate_pairs(x32, rotation)
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def rotate_pairs(x: torch.Tensor, rotation: torch.Tensor | None, out: torch.Tensor | None = None, *,
                 inverse: bool = False, scale: float = 1.0) -> torch.Tensor:
    """The eager form of :func:`apply_rope`: ``scale * rope(x)`` as one complex product per feature pair,
    ``(x[2k] + i x[2k+1]) * (cos + i sin)``; ``inverse`` rotates by the conjugate (the transposed rotation: RoPE's
    backward pass); ``scale * x`` without ``rotation`` (a model without RoPE).

    Args:
        x: ``(..., S, head_dim)`` float32 or float64 with adjacent, aligned feature pairs (last stride 1, even other
            strides and storage offset), read in place.
        rotation: ``(S, head_dim / 2, 2)`` float32 ``(cos, sin)`` from :func:`rope_rotation`, or None.
        out: where to write the result (any strides with adjacent, aligned pairs), or None for a new tensor.
        inverse, scale: see above.

    Returns:
        ``out``, or the new tensor in ``x``'s shape.

    Raises:
        RuntimeError: pairs that are not adjacent and aligned (``torch.view_as_complex``).
    """
    if rotation is None:
        if out is None:
            return x * scale if scale != 1.0 else x.clone()
        return torch.mul(x, scale, out=out) if scale != 1.0 else out.copy_(x)
    r = torch.view_as_complex(rotation if scale == 1.0 else rotation * scale)
    pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
    if out is None:
        return torch.view_as_real(pairs * (r.conj() if inverse else r)).flatten(-2)
    torch.mul(pairs, r.conj() if inverse else r, out=torch.view_as_complex(out.unflatten(-1, (-1, 2))))
    return out
