"""The flow itself: layers, RoPE, KV cache, flow blocks, guidance, Jacobi decoding, STARFlow.

No I/O and no ``torch.distributed``: ``import starflow.models`` loads torch, ``starflow.config`` and
``starflow.models.*`` only.
"""
from starflow.models.jacobi import DecodeStats, JacobiSettings, decode_block
from starflow.models.lora import apply_lora, merge_lora_state
from starflow.models.starflow import STARFlow, FlowOutput, VideoContext, patchify, unpatchify

__all__ = ["STARFlow", "FlowOutput", "VideoContext", "patchify", "unpatchify", "DecodeStats", "JacobiSettings",
           "decode_block", "apply_lora", "merge_lora_state"]
