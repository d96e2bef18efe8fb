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

import gc
import os
import pickle
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from starflow.worker import stop_with_launcher

__all__ = ["DistInfo", "init_distributed", "cleanup_distributed", "pick_device", "world_mesh", "shard_model",
           "any_rank", "is_sharded", "load_full_state_dict", "load_sharded", "prepare_sharded_inference", "from_rank0",
           "stop_with_launcher", "PROCESS_GROUP_TIMEOUT"]

T = TypeVar("T")

PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)
"""How long a collective waits for the other ranks before the process group gives up: gloo's default, for NCCL too
(whose own default is ten minutes), as rank 0 works alone for a while in places: writing a 7B model folder at the end
of training, or a sample grid of a DDP run, while the other ranks wait for it."""


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
        """Whether this is rank 0 (the process that prints and writes shared files)."""
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
        ValueError: ``requested`` is not a device name, is not a CPU, CUDA or (where available) MPS device, names a
            CUDA device this machine does not have, or names one GPU for several processes (``world_size`` > 1),
            which NCCL cannot share.
    """
    if requested:
        try:
            device = torch.device(requested)
        except RuntimeError:
            raise ValueError(f"--device {requested}: not a device; use cpu, cuda or cuda:N") from None
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"--device {requested}: this PyTorch has no Apple GPU (MPS) to run on; use --device cpu")
        if device.type not in ("cpu", "cuda", "mps"):
            raise ValueError(f"--device {requested}: {device.type} devices are not supported; use cpu, cuda or cuda:N")
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
    """Initialise the default process group (NCCL on CUDA, gloo on a CPU; collectives wait
    :data:`PROCESS_GROUP_TIMEOUT` for the other ranks) when launched by torchrun, also for ``--nproc_per_node 1``
    (so ``fsdp: 1`` shards over one GPU as over eight); a no-op for a plain process. Ranks other than 0 turn
    ``transformers``' progress bars off (rank 0 shows them)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launched = "TORCHELASTIC_RUN_ID" in os.environ or world > 1
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank, world)
    if launched:
        stop_with_launcher()
    if launched and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None,
                                timeout=PROCESS_GROUP_TIMEOUT)
    if rank != 0:  # the libraries' own progress bars (loading the text encoder, ...): rank 0's are shown alone
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    return DistInfo(rank, world, local_rank, dev, group=dist.is_available() and dist.is_initialized())


def cleanup_distributed() -> None:
    """Destroy the process group if one was initialised, after a barrier and after collecting unreachable objects
    (a sharded model's parameters, hooks and device mesh hold the group in reference cycles): its worker threads are
    then stopped while the interpreter is fully alive, not in its shutdown."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` was passed to ``fully_shard`` (its parameters are DTensor shards)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def world_mesh(device: torch.device):
    """The 1-D ``DeviceMesh`` of every rank of the default process group, on ``device``'s type.

    ``fully_shard`` without a mesh builds one on the machine's accelerator, CUDA wherever a GPU is visible, and moves
    the parameters there: ``--device cpu`` on a GPU machine would shard onto ``cuda:0`` of every rank.
    """
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dist.get_world_size(),))


def shard_model(model: nn.Module, mesh=None, *, device: torch.device | None = None, mp_policy=None,
                reshard_after_forward: bool = True) -> nn.Module:
    """Apply FSDP2 to a STARFlow in place: each transformer layer, each flow block, the denoiser, the root.

    Args:
        model: a :class:`~starflow.models.STARFlow`, on the meta device or already on its device.
        mesh: a 1-D ``DeviceMesh``; default: :func:`world_mesh` of ``device``.
        device: this rank's device (default: the default process group's, CUDA under NCCL, else the CPU).
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
    if mesh is None:
        mesh = world_mesh(device or torch.device("cuda" if "nccl" in str(dist.get_backend()) else "cpu"))
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
    """The maximum of an int32 scalar flag (shape ``()``) over all ranks (the Jacobi ``rank_sync`` of sharded
    sampling), as a scalar tensor on the flag's device; the flag itself when ``torch.distributed`` is not
    initialised."""
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


FROM_RANK0_TIMEOUT = timedelta(hours=12)
"""How long the other ranks wait for :func:`from_rank0` (indexing a large folder on NFS can take an hour)."""


def from_rank0(make: Callable[[], T]) -> T:
    """``make()`` run on rank 0 only and sent (pickled) to the other ranks: for work every rank would otherwise
    repeat on the same files, e.g. indexing a dataset folder (a stat and an image header per file, on NFS).

    The others wait in a broadcast on a gloo group of its own with :data:`FROM_RANK0_TIMEOUT`, not the default
    group's timeout (ten minutes under NCCL). Without a process group, or on one rank: ``make()``.

    Raises:
        What ``make`` raises on rank 0, on every rank (as a ``RuntimeError`` with its type and message where
        the exception does not survive pickling, or the result cannot be pickled), so no rank waits for ever.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return make()
    try:
        group = dist.new_group(backend="gloo", timeout=FROM_RANK0_TIMEOUT)
    except RuntimeError as err:
        raise RuntimeError(f"cannot connect the ranks over gloo ({err}); if they reach each other on another network "
                           "interface than the default, name it with GLOO_SOCKET_IFNAME") from err
    try:
        payload: list[Any] = [None]
        result, error = None, None
        if dist.get_rank() == 0:
            try:
                result = make()
                payload[0] = pickle.dumps(("result", result))
            except Exception as err:  # noqa: BLE001 - sent to the other ranks, re-raised here below
                error = err
                payload[0] = pickle.dumps(("error", _portable(err)))
        dist.broadcast_object_list(payload, src=0, group=group)
        dist.barrier(group=group)  # every rank has its payload before any rank tears the group down
    finally:
        dist.destroy_process_group(group)
    if dist.get_rank() == 0:
        if error is not None:
            raise error
        return result
    kind, value = pickle.loads(payload[0])
    if kind == "error":
        raise value
    return value


def _portable(err: BaseException) -> BaseException:
    """``err`` if it survives a pickle round trip, else a ``RuntimeError`` with its type and message."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001 - any failure to pickle or rebuild
        return RuntimeError(f"{type(err).__name__}: {err}")


def load_sharded(model: nn.Module, weights, device: torch.device, dtype: torch.dtype | None = None) -> nn.Module:
    """Shard a meta-device STARFlow with FSDP2 and load official-layout weights into the shards.

    Every rank memory-maps the checkpoint (``.safetensors`` and zip ``torch.save`` files) and copies only its
    own ``1/N`` slice of each parameter into its shards, converted to ``dtype`` as it is copied
    (:func:`load_full_state_dict`), so no rank ever holds a full copy of the model, or any copy beyond its
    shards.

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
    shard_model(model, device=device)
    model.to_empty(device=device)
    load_full_state_dict(model, state_dict)
    return model  # every name was loaded: compare_layout checked that the two sets of names are equal


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy complete (unsharded) tensors into a model's parameters and buffers, FSDP2-sharded or not.

    Each rank copies only its own slice of each tensor (``torch.chunk`` along the sharded dimension, as FSDP2
    splits), converting to the parameter's dtype and device as it copies: from a memory-mapped checkpoint it
    reads only its slices' pages, and beyond its shards it holds nothing (no collective is run, no full copy is
    made). Names the model has and ``state_dict`` lacks are left as they are (check the names first).

    Args:
        model: the model (its names as ``torch.distributed.checkpoint.state_dict.get_model_state_dict`` gives
            them: wrapper prefixes removed).
        state_dict: ``{name: full tensor}``.

    Raises:
        KeyError: names the model does not have (listed).
        ValueError: a tensor whose shape does not fit the model's (named).
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.tensor import DTensor

    targets = get_model_state_dict(model)  # the model's own (sharded) tensors: copying into them loads it
    unknown = sorted(set(state_dict) - set(targets))
    if unknown:
        more = f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise KeyError(f"the model has no {', '.join(unknown[:5])}{more}")
    for name, full in state_dict.items():
        target = targets[name]
        if tuple(full.shape) != tuple(target.shape):
            raise ValueError(f"{name}: {tuple(full.shape)} in the checkpoint, {tuple(target.shape)} in the model")
        if isinstance(target, DTensor):
            local, piece = target.to_local(), _local_slice(full, target)
        else:
            local, piece = target, full
        local.copy_(piece)


def _local_slice(full: torch.Tensor, target) -> torch.Tensor:
    """This rank's part of ``full`` for the DTensor ``target`` (``Shard`` placements split like ``torch.chunk``;
    trailing ranks of a short dimension get an empty slice)."""
    piece, coordinate = full, target.device_mesh.get_coordinate()
    for mesh_dim, placement in enumerate(target.placements):
        if placement.is_shard():
            chunks = torch.chunk(piece, target.device_mesh.size(mesh_dim), dim=placement.dim)
            index = coordinate[mesh_dim]
            piece = chunks[index] if index < len(chunks) else piece.narrow(placement.dim, 0, 0)
    shard = tuple(target.to_local().shape)
    if tuple(piece.shape) != shard:
        raise RuntimeError(f"cannot place a slice of {tuple(full.shape)} on a shard of {shard}: the sharding "
                           f"{target.placements} is not one this loader splits")
    return piece
