"""The flow itself: layers, RoPE, KV cache, flow blocks, STARFlow. No I/O, no torch.distributed."""
from starflow.models.starflow import STARFlow, FlowOutput, patchify, unpatchify

__all__ = ["STARFlow", "FlowOutput", "patchify", "unpatchify"]
