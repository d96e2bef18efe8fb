"""Data parallelism for training: FSDP2, DDP, or one process; gradient-sync control and clipping.

* ``fsdp: 1`` under ``torchrun``: :func:`starflow.distributed.shard_model` applies ``fully_shard`` to every
  transformer layer, then each flow block and the learnable denoiser, then the root. In bf16 (``precision``,
  :func:`training_dtype`; the default on CUDA) it computes with bf16 copies of the float32 parameters and
  reduces gradients in fp32 (:func:`mixed_precision_policy`); the flow's scale, shift and log-determinant
  arithmetic, and the activations passed from block to block, are float32 either way. ``fsdp_text_encoder: 1`` shards the
  frozen T5 the same way (each ``T5Block``, then the encoder).
* ``fsdp: 0`` under ``torchrun``: DDP. The learnable denoiser is trained outside the flow's forward, so DDP
  ignores its parameters and :func:`all_reduce_grads` averages them by hand.
* one process: the model as it is.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn

from starflow.config import PRECISIONS, Config
from starflow.distributed import DistInfo, is_sharded, shard_model, world_mesh

__all__ = ["training_dtype", "native_bf16", "mixed_precision_policy", "parallelize", "shard_text_encoder", "gradient_sync", "clip_grad_norm",
           "all_reduce_grads", "full_state_dict"]


def training_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype a training step computes its matmuls in (config key ``precision``).

    ``bf16`` -> ``torch.bfloat16`` (autocast, or FSDP2 bf16 parameters), ``fp32`` -> ``torch.float32``,
    ``auto`` -> bf16 on CUDA (the official recipe, SPEC section 14) and float32 elsewhere.

    Raises:
        ValueError: ``precision`` is none of ``auto``, ``bf16``, ``fp32``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"config key 'precision' must be one of {PRECISIONS}, got {precision!r}")
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.bfloat16 if bf16 else torch.float32


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 matmuls natively: a CUDA device is taken to (Ampere and later do; older
    GPUs emulate bf16, as the official recipe does there too); a CPU when it has AVX512-BF16 or AMX (x86; other
    CPUs are reported as not native). Elsewhere oneDNN emulates bf16, slower than float32."""
    if device.type != "cpu":
        return True
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def mixed_precision_policy(dtype: torch.dtype, cast_forward_inputs: bool = True):
    """The FSDP2 ``MixedPrecisionPolicy`` of a compute dtype: bf16 -> bf16 copies of the float32 parameters while a
    module runs and gradients reduced in float32; float32 -> none.

    Args:
        dtype: the compute dtype (:func:`training_dtype`).
        cast_forward_inputs: whether every sharded module casts its floating-point inputs to bf16. The flow passes
            False: a flow block's input is the previous block's float32 output, on which ``(x - shift) / scale``
            must stay float32 (as under autocast); the model casts to the weights' dtype where a projection
            reads it. The frozen T5 keeps the default.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if dtype == torch.bfloat16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                    cast_forward_inputs=cast_forward_inputs)
    return MixedPrecisionPolicy()


def parallelize(model: nn.Module, cfg: Config, dist: DistInfo) -> nn.Module:
    """Wrap ``model`` for data-parallel training; returns the module whose forward the trainer calls.

    With FSDP2 the model is sharded in place and returned itself; with DDP a ``DistributedDataParallel``
    wrapper is returned (``model`` stays the unwrapped module); with one process ``model``.
    """
    if not dist.distributed:
        return model
    if cfg.fsdp:
        policy = mixed_precision_policy(training_dtype(cfg.precision, dist.device), cast_forward_inputs=False)
        return shard_model(model, device=dist.device, mp_policy=policy)
    denoiser = [n for n, _ in model.named_parameters() if n.startswith("learnable_self_denoiser.")]
    if denoiser:  # trained outside the flow's forward: its gradients are synced by hand
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, denoiser)
    return nn.parallel.DistributedDataParallel(model, device_ids=[dist.device] if dist.device.type == "cuda" else None)


def shard_text_encoder(encoder: nn.Module, dist: DistInfo, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Shard a frozen ``transformers`` T5 encoder with FSDP2 (each ``T5Block``, then the whole encoder).

    Args:
        encoder: a ``T5EncoderModel`` (frozen; only its forward is used).
        dist: this process's rank and device.
        dtype: its compute dtype (bf16: bf16 parameters while it runs).
    """
    from torch.distributed.fsdp import fully_shard

    blocks = [m for m in encoder.modules() if type(m).__name__ == "T5Block"]
    kw = dict(mesh=world_mesh(dist.device), mp_policy=mixed_precision_policy(dtype))
    for block in blocks:
        fully_shard(block, **kw)
    fully_shard(encoder, **kw)
    return encoder


@contextlib.contextmanager
def gradient_sync(train_model: nn.Module, sync: bool) -> Iterator[None]:
    """Gradient all-reduce / reduce-scatter on (``sync``) or off for the backward passes inside.

    Off for all but the last micro-batch of a gradient-accumulation step, so gradients are communicated
    once per optimizer step: DDP's ``no_sync`` or FSDP2's ``set_requires_gradient_sync(False)``.
    """
    if is_sharded(train_model):
        train_model.set_requires_gradient_sync(sync)
        yield
    elif not sync and hasattr(train_model, "no_sync"):
        with train_model.no_sync():
            yield
    else:
        yield


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> float:
    """Clip the global gradient norm (over all ranks for sharded parameters); returns it as a float."""
    norm = torch.nn.utils.clip_grad_norm_(list(params), max_norm)
    if hasattr(norm, "full_tensor"):  # DTensor: the norm over every shard
        norm = norm.full_tensor()
    return norm.item()


def all_reduce_grads(params: Iterable[torch.Tensor], world_size: int) -> None:
    """Average gradients over ranks in place (one flat all-reduce); a no-op for one process."""
    grads = [p.grad for p in params if p.grad is not None]
    if world_size == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world_size
    for g, piece in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(piece.view_as(g))


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The complete (unsharded, CPU) state dict; every rank must call it under FSDP2."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
