"""Sampling: guidance, sequential and Jacobi decoding, denoising of samples."""
from starflow.sampling.denoise import learned_denoise, self_denoise
from starflow.sampling.guidance import guide
from starflow.sampling.jacobi import DecodeStats, JacobiSettings, decode_block

__all__ = ["self_denoise", "learned_denoise", "guide", "decode_block", "JacobiSettings", "DecodeStats"]
