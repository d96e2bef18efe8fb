"""Process groups and sharding: the ``torch.distributed`` code shared by training and sampling.

Process groups work with and without ``torchrun``: under ``torchrun`` (``WORLD_SIZE`` > 1) a process group
is initialised (NCCL on CUDA, gloo on CPU); otherwise everything runs in one process with no process group,
on CUDA if available else CPU.

Sharding a STARFlow over ranks uses FSDP2 (``torch.distributed.fsdp.fully_shard``).

Every transformer layer (:class:`~starflow.models.layers.AttentionBlock`) is its own FSDP unit, then each
flow block and the learnable denoiser (their projections, norms and SOS token), then the root. A rank
holds ``1/N`` of every parameter; a layer's full weights exist only while that layer runs.

Sampling calls the flow blocks through their KV-cached methods, not ``forward``:
:func:`starflow.models.tarflow_block.gathered` gathers a block's own parameters around those calls (its
layers gather themselves when called), and every rank must evaluate the layers equally often (the Jacobi
per-sample stopping rule with ``rank_sync=any_rank``).
"""
from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistInfo", "init_distributed", "cleanup_distributed", "pick_device", "shard_model", "any_rank",
           "is_sharded", "load_full_state_dict", "load_sharded", "prepare_sharded_inference", "from_rank0"]

T = TypeVar("T")


@dataclass
class DistInfo:
    """Where this process runs: ``rank`` of ``world_size``, ``local_rank``, and its device; ``group``: a process
    group is initialised (launched by torchrun, with one process or more)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether this process is one rank of a process group (``fsdp: 1`` shards, the ranks share the work)."""
        return self.group or self.world_size > 1


def pick_device(requested: str | None = None, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """``requested`` ('cpu', 'cuda', 'cuda:1', ...) or the best available device for this rank.

    ``cuda`` without an index, or no request on a machine with GPUs, is this rank's GPU,
    ``cuda:{local_rank % device_count}`` (``cuda:0`` for one process).

    Raises:
        ValueError: ``requested`` is not a device name, names a CUDA device this machine does not have, or names
            one GPU for several processes (``world_size`` > 1), which NCCL cannot share.
    """
    if requested:
        try:
            device = torch.device(requested)
        except RuntimeError:
            raise ValueError(f"--device {requested}: not a device; use cpu, cuda or cuda:N") from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"--device {requested}: no CUDA GPU is available to this PyTorch; use --device cpu")
            if device.index is None:
                return torch.device("cuda", local_rank % torch.cuda.device_count())
            if device.index >= torch.cuda.device_count():
                raise ValueError(f"--device {requested}: there are {torch.cuda.device_count()} GPU(s) (cuda:0 .. "
                                 f"cuda:{torch.cuda.device_count() - 1})")
            if world_size > 1:
                raise ValueError(f"--device {requested} names one GPU for all {world_size} processes: use --device "
                                 "cuda (each process takes cuda:LOCAL_RANK) and choose GPUs with CUDA_VISIBLE_DEVICES")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(device: str | None = None) -> DistInfo:
    """Initialise the default process group (NCCL on CUDA, gloo on a CPU) when launched by torchrun, also for
    ``--nproc_per_node 1`` (so ``fsdp: 1`` shards over one GPU as over eight); a no-op for a plain process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launched = "TORCHELASTIC_RUN_ID" in os.environ or world > 1
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank, world)
    if launched and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank, world, local_rank, dev, group=dist.is_available() and dist.is_initialized())


def cleanup_distributed() -> None:
    """Destroy the process group if one was initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` was passed to ``fully_shard`` (its parameters are DTensor shards)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard_model(model: nn.Module, mesh=None, *, mp_policy=None, reshard_after_forward: bool = True) -> nn.Module:
    """Apply FSDP2 to a STARFlow in place: each transformer layer, each flow block, the denoiser, the root.

    Args:
        model: a :class:`~starflow.models.STARFlow`, on the meta device or already on its device.
        mesh: a 1-D ``DeviceMesh`` (default: all ranks of the default process group).
        mp_policy: optional ``MixedPrecisionPolicy`` (e.g. bf16 parameters, fp32 reduction).
        reshard_after_forward: free the gathered weights after each unit runs (saves memory).

    Returns:
        ``model`` (now an ``FSDPModule``).

    Raises:
        RuntimeError: ``torch.distributed`` is not initialised.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from starflow.models.layers import AttentionBlock
    from starflow.models.tarflow_block import FlowBlock

    if not dist.is_initialized():
        raise RuntimeError("sharding needs torch.distributed: launch with torchrun --nproc_per_node N")
    # Our outputs are never modified in place, so FSDP2's warning about returning views does not apply.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    kw = dict(mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp_policy or MixedPrecisionPolicy())
    for module in model.modules():
        if isinstance(module, AttentionBlock):
            fully_shard(module, **kw)
    for module in model.modules():
        if isinstance(module, FlowBlock) or module is getattr(model, "learnable_self_denoiser", None):
            fully_shard(module, **kw)
    fully_shard(model, **kw)
    return model


def any_rank(flag: torch.Tensor) -> torch.Tensor:
    """The maximum of an int32 flag over all ranks (the Jacobi ``rank_sync`` of sharded sampling); the flag
    itself when ``torch.distributed`` is not initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag


@torch.no_grad()
def prepare_sharded_inference(model: nn.Module, txt_len: int, txt_dim: int | None, device: torch.device) -> None:
    """Run one forward pass on a one-frame zero latent so FSDP2 sets up its root (it must see the root
    run first) before sampling calls the blocks' KV-cached methods.

    Args:
        model: a sharded :class:`~starflow.models.STARFlow` with its weights loaded.
        txt_len, txt_dim: text length and width (``txt_dim`` None for a model without text).
        device: the rank's device.
    """
    c, side = model.config.channel_size, model.latent_side
    shape = (1, 1, c, side, side) if model.config.is_video else (1, c, side, side)
    y = torch.zeros(1, txt_len, txt_dim, device=device) if txt_dim else None
    model(torch.zeros(shape, device=device), y)


def from_rank0(make: Callable[[], T]) -> T:
    """``make()`` run on rank 0 only and sent (pickled) to the other ranks: for work every rank would otherwise
    repeat on the same files, e.g. indexing a dataset folder (a stat and an image header per file, on NFS).

    Without a process group, or on one rank: ``make()``.

    Raises:
        What ``make`` raises on rank 0, on every rank (as a ``RuntimeError`` with its message where the
        exception cannot be pickled), so no rank waits for the others.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return make()
    payload: list[Any] = [None]
    error: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            payload[0] = make()
        except Exception as err:  # noqa: BLE001 - sent to the other ranks, re-raised here below
            error = err
            try:
                pickle.dumps(err)
                payload[0] = err
            except Exception:  # noqa: BLE001
                payload[0] = RuntimeError(f"{type(err).__name__}: {err}")
    dist.broadcast_object_list(payload, src=0)
    if error is not None:
        raise error
    if isinstance(payload[0], BaseException):
        raise payload[0]
    return payload[0]


LOAD_GROUP_BYTES = 1 << 28
"""Checkpoint bytes :func:`load_sharded` scatters and loads at a time (256 MiB)."""


def load_sharded(model: nn.Module, weights, device: torch.device, dtype: torch.dtype | None = None) -> nn.Module:
    """Shard a meta-device STARFlow with FSDP2 and load official-layout weights into the shards.

    Every rank memory-maps the checkpoint (``.safetensors`` and zip ``torch.save`` files) and keeps only its
    own ``1/N`` slice of each parameter, converted to ``dtype`` as it is copied in, so no rank ever holds a
    full copy of the model: beyond its shards, a rank holds at most about :data:`LOAD_GROUP_BYTES` ``/ N`` of
    scattered slices (and one full tensor at a time on the device).

    Args:
        model: a :class:`~starflow.models.STARFlow` built on the meta device.
        weights: checkpoint file (``.pth`` / ``.safetensors``, see :func:`starflow.checkpoint.read_state_dict`).
        device: this rank's device.
        dtype: optional parameter dtype (e.g. ``torch.bfloat16``).

    Returns:
        ``model``, sharded and loaded.

    Raises:
        FileNotFoundError, CheckpointError: unreadable file; LayoutError: names or shapes differ (all
        listed). Checked before any parameter is allocated.
    """
    from starflow.checkpoint import LayoutError, compare_layout, drop_deprecated, read_state_dict

    state_dict = drop_deprecated(read_state_dict(weights))
    report = compare_layout(model, state_dict)
    if not report.ok:
        raise LayoutError(report, str(weights))
    if dtype is not None:  # the shards convert as they are filled: no rank makes a converted copy of the model
        model.to(dtype)
    shard_model(model)
    model.to_empty(device=device)
    load_full_state_dict(model, state_dict, sharded=True)
    return model  # every name was loaded: compare_layout checked that the two sets of names are equal


def load_full_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], *, sharded: bool) -> None:
    """Load complete (unsharded) tensors into a model, FSDP2-sharded or not, in groups of about
    :data:`LOAD_GROUP_BYTES`: the scattered slices of a group are held until it is loaded, so one call for
    everything would hold a ``1/N`` copy of the model in the checkpoint's dtype on every rank. Names the
    model lacks are an error of ``load_state_dict``; names it has and ``state_dict`` lacks are left as they
    are (check the names first). Every rank must call it with the same names under FSDP2.

    Args:
        model: the model, FSDP2-sharded (``sharded``: each rank keeps its slices) or not.
        state_dict: ``{name: full tensor}``, e.g. memory-mapped from a checkpoint; values are converted to
            the parameters' dtypes as they are copied in.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=sharded, strict=False)
    group: dict[str, torch.Tensor] = {}
    for i, (name, value) in enumerate(state_dict.items()):
        group[name] = value
        if sum(v.nbytes for v in group.values()) >= LOAD_GROUP_BYTES or i == len(state_dict) - 1:
            set_model_state_dict(model, group, options=options)
            group = {}
