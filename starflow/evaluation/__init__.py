"""Evaluation: exact likelihood (bits/dim), sample sets (``generate-set``) and sample metrics (FID, KID,
precision/recall, CLIP score)."""
from starflow.evaluation.nll import PIXEL_SCALE_BITS, NLLResult, evaluate_nll

__all__ = ["PIXEL_SCALE_BITS", "NLLResult", "evaluate_nll"]
