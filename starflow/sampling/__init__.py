"""Sampling: text -> pixels (:class:`Pipeline`), denoising of samples, writing samples to files.

Guidance and sequential / Jacobi decoding are part of the flow's inverse and live in
:mod:`starflow.models.guidance` and :mod:`starflow.models.jacobi`; they are re-exported here.
"""
from starflow.models.guidance import guide
from starflow.models.jacobi import DecodeStats, JacobiSettings, decode_block
from starflow.sampling.denoise import learned_denoise, self_denoise
from starflow.sampling.pipeline import Pipeline, Profile, SampleSettings, pixel_mask_like

__all__ = ["Pipeline", "SampleSettings", "Profile", "pixel_mask_like", "self_denoise", "learned_denoise", "guide",
           "decode_block", "JacobiSettings", "DecodeStats"]
