"""The training loop: the STARFlow recipe (arXiv 2506.06276, Sec. 4; SPEC section 14), resumable to the step.

``x = vae.encode(img) + noise_std * N(0, I)``, captions dropped to ``""`` with probability ``drop_label``,
AdamW (0.9, 0.95), warm-up + cosine, gradient clipping / skipping, bf16 autocast (config ``precision``; on CUDA
by default). One process or many under ``torchrun`` (FSDP2 or DDP, see :mod:`starflow.train.parallelize`);
sharded DCP checkpoints restore model, optimizer, schedule, step, data position and RNG
(:mod:`starflow.train.state`).

The noise, caption dropout and ``drop_image`` of a step are drawn from generators seeded by
``(seed, step, global sample index)``, and the sampler hands out the same global batch for any number of
ranks: the same config on 1 or N processes computes the same losses, and a resumed run continues the
uninterrupted one exactly.

Video (STARFlow-V, arXiv 2511.20462): batches are ``(B, T, C, H, W)``; with probability ``drop_image`` a
batch loses its first frame and its captions get the ``(extend) `` prefix (SPEC section 11). The learnable
self-denoiser trains beside the flow with its own AdamW (``denoiser_lr``, weight decay 1e-4): its target
is ``noise_std * numel(x) * dL/dx`` (SPEC section 10), read from the flow's own backward pass (the noisy
latents require grad), so it costs one denoiser forward/backward and no second flow pass.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from starflow.adapters import LabelEncoder, LatentAdapter, TextEncoder, build_text_encoder
from starflow.assets import TINY_TEXT_ENCODER
from starflow.config import TRAINING_KEYS, Config, save_config
from starflow.data import (AspectBucketBatchSampler, ImageFolder, PositionTracker, ResumableBatchSampler, ShardStream,
                           STREAM_VERSION, check_cacheable, collate, continue_positions, load_uncond, sample_seed)
from starflow.distributed import DistInfo, from_rank0, is_sharded, prepare_sharded_inference
from starflow.folder_lock import FolderLock
from starflow.models import STARFlow
from starflow.sampling.io import filmstrips, save_grid, view_scale
from starflow.sampling.pipeline import Pipeline, SampleSettings
from starflow.console import showing_log_lines
from starflow.signals import StopSignals, Stopped, agreed_stop, init_data_worker, stop_signals_held
from starflow.train.ema import EMA, EMA_WEIGHTS
from starflow.train.init_from import InitReport, base_identity, check_base, check_lora_base, init_from
from starflow.models.lora import ADAPTER_WEIGHTS, LORA_MARK, merge_lora_state
from starflow.train.logging import MetricsLogger
from starflow.train.optim import build_cosine_schedule, build_optimizer, build_schedule, rebase_schedule
from starflow.train.recipe import Recipe
from starflow.train.parallelize import (all_reduce_grads, clip_grad_norm, full_state_dict, gradient_sync, parallelize,
                                        native_bf16, shard_text_encoder, training_dtype)
from starflow.train.state import (TRAINING_META, CheckpointManager, CheckpointMismatchError, read_meta, rng_state,
                                  set_rng_state)

__all__ = ["Trainer", "TrainingDiverged", "TrainingStopped", "GRAD_SKIP_AFTER", "check_batch_split",
           "check_drop_image", "check_training"]

GRAD_SKIP_AFTER = 100  # grad_skip applies from this step on (SPEC section 14)
DENOISER_WEIGHT_DECAY = 1e-4  # SPEC section 10
DENOISER_BETAS = (0.9, 0.999)  # its own AdamW, of which SPEC section 10 sets only lr and weight decay: AdamW's defaults
DENOISER_FINAL_LR = 1e-6  # the denoiser's cosine ends here (SPEC section 16)
SAMPLE_PROMPTS = 10  # captions in the periodic sample grid


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient (``max_nonfinite``); ``metrics`` are those of the
    last one."""

    def __init__(self, message: str, metrics: dict[str, float] | None = None) -> None:
        super().__init__(message)
        self.metrics = metrics or {}


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process so far, in GiB: allocated CUDA memory on a GPU, else the peak resident set (NaN
    where the platform does not say: Windows)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # bytes on macOS, kB on Linux


class TrainingStopped(Stopped):
    """Training stopped on a signal (:class:`starflow.signals.StopSignals`) after writing a checkpoint (none while
    non-finite steps last: the latest one is from before them); ``signum`` is the signal."""

    def __init__(self, signum: int, step: int, saved: bool = True) -> None:
        super().__init__(signum, f"at step {step}, " + ("after writing its checkpoint" if saved else
                                                        "without a checkpoint (its last steps were non-finite: it "
                                                        "resumes from the latest one, from before them)"))


def changed_keys(saved: dict, now: dict, model_only: bool = False) -> list[str]:
    """``"key old -> new"`` for each config key whose value differs between a checkpoint's config and the run's, but
    ``logdir`` (a copied run's folder) (``model_only``: leave out the training-only keys as well)."""
    return [f"{k} {saved[k]} -> {now[k]}" for k in sorted(now) if k in saved and saved[k] != now[k]
            and k != "logdir" and not (model_only and k in TRAINING_KEYS)]


def data_fingerprint(data: Any) -> dict[str, Any] | None:
    """What identifies a training dataset's samples, for a resume to notice that they changed: ``{"samples": N,
    "sha": 16 hex digits}``, over each shard's name and sample count (webdataset shards, their ``index.json``), or over
    a folder's listed files (relative to its root) and their captions, in their order; None for other datasets.
    (A file rewritten under the same name is not noticed: the listing is hashed, not the files' bytes.)"""
    import hashlib

    if isinstance(getattr(data, "sizes", None), dict):  # ShardStream
        listing, samples = [f"{Path(k).name}\t{v}" for k, v in data.sizes.items()], int(data.num_samples)
    elif isinstance(getattr(data, "paths", None), list) and getattr(data, "root", None) is not None:
        root, texts = Path(data.root), getattr(data, "texts", None) or [""] * len(data.paths)
        listing = [f"{Path(p).relative_to(root) if Path(p).is_relative_to(root) else p}\t{t}"
                   for p, t in zip(data.paths, texts)]
        samples = len(data.paths)
    else:
        return None
    return {"samples": samples, "sha": hashlib.sha256("\n".join(listing).encode("utf-8")).hexdigest()[:16]}


def _saved_config(path: str | Path) -> dict[str, Any]:
    """The config a checkpoint was saved with (empty when its meta file cannot be read: loading it says why)."""
    try:
        return read_meta(path).get("config", {})
    except (OSError, ValueError):
        return {}


def _lora_mismatch(path: str | Path, saved: dict[str, Any], cfg: Config) -> str:
    """The message for a checkpoint of a LoRA run resumed as a full one, or the other way round."""
    if saved.get("lora_rank"):
        flags = " ".join(f"--{k} {saved[k]}" for k in ("lora_rank", "lora_alpha", "init_from") if saved.get(k))
        targets = saved.get("lora_targets")
        flags += f" --lora_targets {targets}" if targets and targets != cfg.lora_targets else ""
        return (f"{path} is a checkpoint of a LoRA run (the adapters alone, over the base weights of its init_from), "
                f"and this run has no LoRA: resume it with its flags, {flags}, or pass a new --logdir")
    return (f"{path} is a checkpoint of a run that trains every weight, and this run trains LoRA adapters "
            f"(lora_rank {cfg.lora_rank}): resume it without the LoRA flags, or train the adapters in a new --logdir "
            f"(--init_from {path} adapts its weights)")


HISTORY_STEPS = 100_000
"""Steps whose metrics :meth:`Trainer.fit` keeps in memory (about 0.75 kB each) and returns."""


def _plain_worker_error(err: Exception) -> Exception | None:
    """The error a DataLoader worker raised, as the training process would have raised it: torch re-raises it with
    a "Caught ... Original Traceback" text whose last line ("RuntimeError: every image ... is unreadable") is the
    news. ``None`` when ``err`` is not such an error, when its type takes other arguments, or with
    ``STARFLOW_DEBUG`` set (debugging: torch's text, with the worker's traceback)."""
    lines = str(err).rstrip().splitlines()
    name, _, text = lines[-1].partition(": ") if lines else ("", "", "")
    if os.environ.get("STARFLOW_DEBUG") or len(lines) < 2 or not lines[0].startswith("Caught ") or not text \
            or name.rpartition(".")[2] != type(err).__name__:
        return None
    try:
        return type(err)(text)
    except Exception:  # noqa: BLE001 - an exception type that takes other arguments
        return None


@contextlib.contextmanager
def _worker_batches(dataset, num_workers: int, **loader_args: Any) -> Iterator[Iterator]:
    """Iterate a ``DataLoader(dataset, num_workers=num_workers, **loader_args)`` whose workers leave SIGTERM and
    SIGINT to the training process (which stops after the step with a checkpoint; torch's worker handler would die
    on a signal sent to the process group, and the loader with it): the signals are held while the workers start
    (:func:`starflow.signals.stop_signals_held`; under spawn a worker imports for seconds before its
    ``worker_init_fn`` runs) and ignored by them afterwards (:func:`starflow.signals.init_data_worker`).
    On leaving (an epoch's end, an error, a stop) the workers are shut down at once: as they ignore SIGTERM, Python's
    exit, which stops workers left running with SIGTERM and waits for them, would wait for ever; one still alive
    after torch's shutdown is killed. A worker's error is raised as :func:`_plain_worker_error` gives it."""
    context = loader_args.get("multiprocessing_context")
    method = context if isinstance(context, str) or context is None else context.get_start_method()
    with stop_signals_held(method) if num_workers > 0 else contextlib.nullcontext():
        batches = iter(DataLoader(dataset, num_workers=num_workers, **loader_args,
                                  worker_init_fn=functools.partial(init_data_worker, log_lines=showing_log_lines())))
    try:
        yield batches
    except Exception as err:
        plain = _plain_worker_error(err)
        if plain is None:
            raise
        raise plain from None
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)  # (worker processes only: num_workers > 0)
        if shutdown is not None:
            shutdown()
            for worker in getattr(batches, "_workers", ()):
                if worker.is_alive():
                    worker.kill()


def check_batch_split(cfg: Config, world_size: int) -> None:
    """Refuse a global batch that ``world_size`` processes x ``grad_accum`` micro-batches cannot split evenly.

    Raises:
        ValueError: ``batch_size`` or ``secondary_batch_size`` not divisible by ``world_size * grad_accum``.
    """
    for key in ("batch_size", "secondary_batch_size"):
        value = getattr(cfg, key) or cfg.batch_size
        if value % (world_size * cfg.grad_accum):
            raise ValueError(f"config key '{key}' ({value}) must be divisible by world size x grad_accum "
                             f"({world_size} x {cfg.grad_accum})")


def check_drop_image(cfg: Config) -> None:
    """Refuse ``drop_image`` > 0 on an image config (training and ``cache-latents``: it drops the first frame of clips).

    Raises:
        ValueError: naming the key and the fix.
    """
    if cfg.drop_image > 0 and not cfg.is_video:
        raise ValueError(f"config key 'drop_image' ({cfg.drop_image:g}) drops the first frame of video clips; this "
                         "config has no vid_size: set --drop_image 0")


def check_training(cfg: Config, has_secondary: bool | None = None) -> None:
    """Refuse training keys that this run could not honour or that would do nothing, from the config alone (the
    ``train`` command calls it before anything loads; :class:`Trainer` again). ``has_secondary``: whether secondary
    images are given (default: the config's ``secondary_data``).

    Raises:
        ValueError: ``loss_scaling: 1``; ``secondary_ratio`` > 0 without secondary images, or secondary images with
            ``secondary_ratio`` 0; video keys or ``drop_image`` > 0 on an
            image config; ``grad_skip`` without ``grad_clip``; ``drop_label`` > 0 or ``fsdp_text_encoder`` on a
            model without text (``fsdp_text_encoder`` with class labels too); a ``learnable_self_denoiser`` with
            ``noise_type: uniform``.
    """
    if cfg.loss_scaling:
        raise ValueError("config key 'loss_scaling: 1' (fp16 dynamic loss scaling) is not supported: training runs "
                         "in float32 or bf16 autocast, which need no loss scaling; set --loss_scaling 0")
    if cfg.learnable_self_denoiser and cfg.noise_type == "uniform":
        raise ValueError("config key 'learnable_self_denoiser' learns to remove the Gaussian noise_std noise; with "
                         "'noise_type: uniform' there is none (dequantisation), and sampling would never use it: set "
                         "--learnable_self_denoiser 0")
    if cfg.secondary_ratio > 0 and not (bool(cfg.secondary_data) if has_secondary is None else has_secondary):
        raise ValueError("config key 'secondary_ratio' > 0 trains some steps on secondary images: pass them with "
                         "--secondary_data FOLDER (an image folder with metadata.jsonl), or set --secondary_ratio 0")
    if cfg.secondary_data and cfg.secondary_ratio == 0:
        raise ValueError(f"config key 'secondary_data' ({cfg.secondary_data}) is used on a secondary_ratio share of "
                         "the steps, which is 0: set --secondary_ratio (e.g. 0.2), or drop --secondary_data")
    video = [k for k in ("temporal_causal", "shallow_block_local", "denoiser_window") if getattr(cfg, k)]
    if video and not cfg.is_video:  # (the flow takes them for clips; an image run has none)
        raise ValueError(f"config key '{video[0]}' ({getattr(cfg, video[0])}) acts on video clips, and this config "
                         "trains on images (no vid_size): set vid_size, or drop the key")
    check_drop_image(cfg)
    if cfg.grad_skip and not cfg.grad_clip > 0:
        raise ValueError("config key 'grad_skip' skips updates whose gradient norm exceeds grad_clip, which is 0 (off): "
                         "set --grad_clip (e.g. 1), or --grad_skip 0")
    if cfg.fsdp_text_encoder and (cfg.txt_size == 0 or str(cfg.text).endswith(".vocab")):
        raise ValueError("config key 'fsdp_text_encoder' shards the T5 text encoder, and this model has none (class "
                         "labels, or txt_size 0): set --fsdp_text_encoder 0")
    if cfg.lora_rank and not cfg.init_from:
        raise ValueError(f"--lora_rank {cfg.lora_rank} trains low-rank adapters over base weights: pass them with "
                         "--init_from (a model folder or weights file); without them there is nothing to adapt")
    if cfg.drop_label > 0 and cfg.txt_size == 0:
        raise ValueError(f"config key 'drop_label' ({cfg.drop_label:g}) drops captions, and this model has none "
                         "(txt_size 0, unconditional): set --drop_label 0")


class Trainer:
    """Trains a :class:`STARFlow` on a captioned image folder.

    Args:
        cfg: resolved config (``batch_size`` is global; each rank gets ``batch_size // world_size``).
        dist: this process's rank and device.
        model: the flow, unwrapped: the trainer wraps it itself for data parallelism, FSDP2 and ``compile``
            (:func:`starflow.train.parallelize.parallelize`) into :attr:`train_model`.
        text_encoder: frozen text encoder or None.
        vae: latent adapter.
        dataset: training data (:func:`starflow.data.build_dataset`): an image or video folder, or a :class:`ShardStream`.
        logdir: output folder (checkpoints, samples, ``metrics.jsonl``, ``config.yaml``).
        secondary: the secondary image set of the video recipe (``secondary_ratio``, SPEC section 16), or None.

    Raises:
        ValueError: ``batch_size`` or ``secondary_batch_size`` not divisible by world size x ``grad_accum``, and the
            other config checks of the constructor (each message names the key).
    """

    def __init__(self, cfg: Config, dist: DistInfo, model: STARFlow, text_encoder: TextEncoder | None,
                 vae: LatentAdapter, dataset: ImageFolder | ShardStream, logdir: Path,
                 secondary: ImageFolder | None = None) -> None:
        check_batch_split(cfg, dist.world_size)
        check_training(cfg, has_secondary=secondary is not None)
        latent_cache = isinstance(dataset, ShardStream) and dataset.decoder.kind == "latent"
        if latent_cache and not cfg.no_flip:
            raise ValueError("flipping (no_flip: 0) needs pixels, and a latent cache holds the unflipped latents: set "
                             "--no_flip 1, or train on the images/videos (or their shards)")
        if latent_cache:
            check_cacheable(cfg)
        self.cfg, self.dist, self.logdir = cfg, dist, Path(logdir)
        self._pin_memory = dist.device.type == "cuda"  # batches in page-locked memory: asynchronous copies to the GPU
        self.model, self.text_encoder, self.vae, self.dataset = model, text_encoder, vae, dataset
        meta = any(p.is_meta for p in model.parameters())  # built for init_from: allocated here, loaded later
        if meta and not (cfg.fsdp and dist.distributed):
            model.to_empty(device=dist.device)
        if cfg.compile:  # each transformer layer, before FSDP2 wraps it
            model.compile_training()
        self.compute_dtype = training_dtype(cfg.precision, dist.device)
        if self.compute_dtype == torch.bfloat16 and not native_bf16(dist.device):
            self._log("precision bf16: this CPU has no native bf16 (AVX512-BF16 or AMX), so its bf16 matmuls are "
                      "emulated and slower than float32; --precision fp32 (or auto) trains faster here")
        self.train_model: torch.nn.Module = parallelize(model, cfg, dist)
        self.sharded = is_sharded(model)
        if meta and self.sharded:
            model.to_empty(device=dist.device)  # each rank allocates only its shards
        self.text_sharded = bool(cfg.fsdp_text_encoder and dist.distributed and isinstance(text_encoder, TextEncoder))
        if self.text_sharded:
            shard_text_encoder(text_encoder.encoder, dist, self.compute_dtype)
        self.lora = cfg.lora_rank > 0
        # init_from weights still to load (LoRA runs loaded their base when built): a resume or initialise_from
        # loads them, and fit does itself if neither ran, so the key is honoured from Python as from the CLI
        self.init_pending = bool(cfg.init_from) and not self.lora
        self.lora_base: dict | None = None  # init_from.base_identity of a LoRA run's base, saved in its checkpoints
        self.denoiser = None if self.lora else model.learnable_self_denoiser  # LoRA: only the adapters train
        den_ids = {id(p) for p in self.denoiser.parameters()} if self.denoiser is not None else set()
        self.flow_params = [p for p in model.parameters() if id(p) not in den_ids]  # (clipped apart from the denoiser)
        self.optimizer = build_optimizer((p for p in self.flow_params if p.requires_grad), cfg)
        self.denoiser_optimizer = None
        if self.denoiser is not None:
            self.denoiser_optimizer = build_optimizer(self.denoiser.parameters(), cfg, lr=cfg.denoiser_lr,
                                                      weight_decay=DENOISER_WEIGHT_DECAY, betas=DENOISER_BETAS)
        self.schedule = build_schedule(self.optimizer, cfg)
        self.denoiser_schedule = None
        if self.denoiser is not None:  # its own cosine, denoiser_lr -> 1e-6 over the run (SPEC section 16)
            self.denoiser_schedule = build_cosine_schedule(self.denoiser_optimizer, cfg.denoiser_lr,
                                                           DENOISER_FINAL_LR, cfg.steps)
        self.recipe = Recipe(cfg, vae, dist.device)
        self.ema = EMA(model, cfg.ema, cfg.ema_start) if cfg.ema > 0 else None
        self.step = 0
        self.skipped_updates = 0
        self.elapsed_s = 0.0  # wall time of the run so far, over all its resumes (seconds; saved in checkpoints)
        self.skipped_files: set[str] = set()  # unreadable or missing data files met by this rank
        self._skipped_seen, self._skipped_total = -1, 0  # skipped_images: gathered again only when a set grew
        self._dataset_files: dict[int, set[str]] = {}  # id(folder dataset) -> its files (what its skipped set takes)
        for data in (dataset, secondary):
            self._note_skipped(getattr(data, "skipped", ()))  # found while listing the folder
        self.nonfinite_in_a_row, self.first_nonfinite_step = 0, 0
        self.micro = cfg.batch_size // (dist.world_size * cfg.grad_accum)
        self.stream = dataset if isinstance(dataset, ShardStream) else None
        self.batches, self.tracker, self._uncond_cache = None, PositionTracker(cfg.num_workers), {}
        if self.stream is None:
            self.batches = ResumableBatchSampler(AspectBucketBatchSampler(
                dataset.buckets, self.micro, shuffle=True, seed=cfg.seed, drop_last=True, rank=dist.rank,
                world_size=dist.world_size, grad_accum=cfg.grad_accum))
            if len(self.batches.sampler) == 0:
                raise ValueError(f"dataset of {len(dataset)} samples is smaller than one global batch of "
                                 f"{cfg.batch_size}: lower --batch_size or add data")
        self.secondary, self.secondary_batches = secondary, None
        self._data_fingerprints: dict[str, Any] | None = None
        if secondary is not None:  # images as one-frame videos on a secondary_ratio share of the steps
            micro = (cfg.secondary_batch_size or cfg.batch_size) // (dist.world_size * cfg.grad_accum)
            self.secondary_batches = ResumableBatchSampler(AspectBucketBatchSampler(
                secondary.buckets, micro, shuffle=True, seed=cfg.seed + 1, drop_last=True, rank=dist.rank,
                world_size=dist.world_size, grad_accum=cfg.grad_accum))
            if len(self.secondary_batches.sampler) == 0:
                raise ValueError(f"secondary_data of {len(secondary)} images is smaller than one global batch of "
                                 f"{cfg.secondary_batch_size or cfg.batch_size}")
        self.checkpoints = CheckpointManager(self.logdir / "checkpoints", cfg.keep_last, rank=dist.rank,
                                             required_meta=TRAINING_META)
        self.sample_prompts = sorted(set(getattr(dataset, "texts", [])))[:SAMPLE_PROMPTS]
        # an epoch in optimizer steps: the global batches of one pass over the training data (sample_freq counts
        # epochs, as the official flag does)
        if self.stream is None:
            self.steps_per_epoch = max(1, len(self.batches.sampler) // cfg.grad_accum)
        else:
            self.steps_per_epoch = max(1, self.stream.num_samples // cfg.batch_size)

    # ------------------------------------------------------------------ state
    def _tensor_state(self) -> dict[str, Any]:
        """Model and optimizer state as DCP state dicts (sharded DTensors under FSDP2)."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        options = StateDictOptions(ignore_frozen_params=self.lora)  # LoRA: the adapters only
        state = {"model": get_model_state_dict(self.model, options=options),
                 "optimizer": get_optimizer_state_dict(self.model, self.optimizer)}
        if self.denoiser_optimizer is not None:
            state["denoiser_optimizer"] = get_optimizer_state_dict(self.model, self.denoiser_optimizer)
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()  # loaded in place
        return state

    def save(self) -> Path:
        """Write a checkpoint of everything needed to resume (every rank must call it)."""
        meta = {"step": self.step, "skipped_updates": self.skipped_updates, "elapsed_s": self.elapsed_s,
                "schedule": self.schedule.state_dict(),
                "world_size": self.dist.world_size, "config": self.cfg.to_dict()}
        if self.denoiser_schedule is not None:
            meta["denoiser_schedule"] = self.denoiser_schedule.state_dict()
        if self.stream is not None and self.sample_prompts:  # (a stream's: its first batch's, kept for the grids)
            meta["sample_prompts"] = list(self.sample_prompts)
        if self.lora and self.cfg.init_from and self.dist.is_main:  # (meta is rank 0's)
            if self.lora_base is None:  # hashed once per run, at its first checkpoint
                self.lora_base = base_identity(self.cfg.init_from)
            meta["lora_base"] = self.lora_base
        meta["data"] = self._data_identity()
        local = {"data": self._data_position(), "rng": rng_state(self.dist.device)}
        return self.checkpoints.save(self.step, self._tensor_state(), meta, local)

    def _data_identity(self) -> dict[str, Any]:
        """:func:`data_fingerprint` of the training data (and of the secondary images), computed once per run."""
        if self._data_fingerprints is None:
            self._data_fingerprints = {"data": data_fingerprint(self.stream if self.stream is not None else
                                                                self.dataset)}
            if self.secondary is not None:
                self._data_fingerprints["secondary"] = data_fingerprint(self.secondary)
        return self._data_fingerprints

    def _note_changed_data(self, path: Path, meta: dict[str, Any]) -> None:
        """Say so when the training data (or the secondary images) differ from those a checkpoint was trained on:
        the run goes on from the saved position in the new data, which is not the order the first run would have
        seen (checkpoints written before the data were recorded say nothing)."""
        for key, saved in (meta.get("data") or {}).items():
            now = self._data_identity().get(key)
            if saved and now and saved != now:
                what = "secondary images" if key == "secondary" else "training data"
                counts = (f"{saved['samples']} -> {now['samples']} samples" if saved["samples"] != now["samples"]
                          else f"the same {now['samples']} samples in number, another listing")
                self._log(f"note: the {what} differ from those {path} was trained on ({counts}): the run goes on "
                          "from its saved data position in the new data, so the batches from here are not the ones "
                          "it would have seen (resume with the same data for the exact order)")

    def load(self, path: str | Path) -> None:
        """Restore a checkpoint written by :meth:`save` (on any number of ranks).

        Raises:
            CheckpointMismatchError: the checkpoint's tensors do not fit this run's model or optimizer (saved with
                another config); the message names the changed config keys.
            ValueError: another ``seed`` with the built-in tiny text encoder, whose weights are drawn from it (the
                flow was trained on the embeddings of the saved seed's encoder).
        """
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        saved = _saved_config(path)
        if (self.cfg.txt_size > 0 and self.cfg.text == TINY_TEXT_ENCODER == saved.get("text")
                and saved.get("seed", self.cfg.seed) != self.cfg.seed):
            raise ValueError(f"--seed {self.cfg.seed}: {path} was trained with the built-in tiny text encoder drawn "
                             f"from seed {saved['seed']}, and another seed draws another encoder: resume with --seed "
                             f"{saved['seed']}, or start a new --logdir")
        tensors = self._tensor_state()
        ema_added = self.ema is not None and not saved.get("ema", 1)  # switched on at this resume
        if ema_added:
            del tensors["ema"]
        fresh_lrs = (list(self.schedule.base_lrs),
                     None if self.denoiser_schedule is None else list(self.denoiser_schedule.base_lrs))
        optimizers = [o for o in (self.optimizer, self.denoiser_optimizer) if o is not None]
        fresh_groups = [[{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}
                         for g in o.param_groups] for o in optimizers]
        try:
            meta, local = self.checkpoints.load(path, tensors)
        except CheckpointMismatchError as e:
            saved = e.meta.get("config", {})
            if bool(saved.get("lora_rank")) != self.lora:  # the adapters alone, or full weights: neither loads
                raise CheckpointMismatchError(_lora_mismatch(path, saved, self.cfg), e.meta) from None
            changed = changed_keys(saved, self.cfg.to_dict(), model_only=True)
            raise CheckpointMismatchError(
                f"{e}: it was saved with another config ({', '.join(changed) or 'see its trainer.json'}); resume with "
                f"the config it was saved with, or train the new model in a new --logdir (--init_from {path} starts "
                "it from these weights where the shapes allow)", e.meta) from None
        set_model_state_dict(self.model, tensors["model"], options=StateDictOptions(strict=not self.lora))
        if ema_added:
            self.ema.reset()
            self._log(f"note: ema {self.cfg.ema:g} is new at this resume: the average starts from the weights of "
                      f"step {meta['step']}")
        set_optimizer_state_dict(self.model, self.optimizer, tensors["optimizer"])
        if self.denoiser_optimizer is not None:
            set_optimizer_state_dict(self.model, self.denoiser_optimizer, tensors["denoiser_optimizer"])
        for optimizer, groups in zip(optimizers, fresh_groups):  # the config's weight_decay, betas, ...: as lr, the
            for group, fresh in zip(optimizer.param_groups, groups):  # values of this run, not the saved ones
                group.update(fresh)
        self.schedule.load_state_dict(meta["schedule"])
        rebase_schedule(self.schedule, fresh_lrs[0])  # a changed lr, min_lr, warmup_steps or steps applies from here
        if self.denoiser_schedule is not None and "denoiser_schedule" in meta:
            self.denoiser_schedule.load_state_dict(meta["denoiser_schedule"])
            rebase_schedule(self.denoiser_schedule, fresh_lrs[1])
        if self.lora and self.cfg.init_from:  # the adapters apply to the base they were trained over
            check_base(meta.get("lora_base"), self.cfg.init_from, f"resuming {path}")
            self.lora_base = meta.get("lora_base")
        self.step, self.skipped_updates = meta["step"], meta["skipped_updates"]
        if self.stream is not None and meta.get("sample_prompts"):  # the grids' prompts, not the next batch's
            self.sample_prompts = list(meta["sample_prompts"])
        self.init_pending = False  # the checkpoint holds the weights trained since init_from
        self.nonfinite_in_a_row = 0  # a resume is a new attempt (often with a lower lr): its streak starts afresh
        self.elapsed_s = float(meta.get("elapsed_s", 0.0))  # older checkpoints: counted from this resume
        changed = changed_keys(meta.get("config", {}), self.cfg.to_dict())
        if changed:
            self._log(f"note: resuming with changed config keys, which apply from step {self.step} on: "
                      f"{', '.join(changed)} (the model folder records the new values)")
        if meta["world_size"] < self.dist.world_size:  # (said by rank 0, which has its own state)
            first, last = meta["world_size"], self.dist.world_size - 1
            ranks = f"rank {last} continues" if first == last else f"ranks {first} to {last} continue"
            self._log(f"{path} was written by {first} process(es); {ranks} the data order of rank 0 with fresh RNG "
                      "states")
        if local is None:  # written by fewer ranks: the global batches are the same, only RNG states differ
            local = self.checkpoints.load_local(path, 0)
        else:
            set_rng_state(local["rng"], self.dist.device)
        self._note_changed_data(path, meta)
        self._set_data_position(local["data"], path, meta)

    def initialise_from(self, path: str | Path) -> InitReport:
        """Fine-tune: load weights (``--init_from``, see :mod:`starflow.train.init_from`) into the model, the EMA
        starting from them; logs the table of loaded / new / dropped parameters."""
        report = init_from(self.model, path)
        if self.lora:
            check_lora_base(report)
        self.init_pending = False
        if self.ema is not None:
            self.ema.reset()
        self._log(report.table())
        return report

    def resume(self) -> bool:
        """Load the latest checkpoint in ``logdir`` if there is one; returns whether it did."""
        path = self.checkpoints.latest()
        if path is None:
            return False
        self.load(path)
        self._log(f"resumed from {path} at step {self.step}")
        return True

    # ------------------------------------------------------------------ one step
    def _autocast(self):
        if self.compute_dtype == torch.bfloat16 and not self.sharded:  # FSDP2 casts the parameters to bf16 itself
            return torch.autocast(self.dist.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _uncond(self, aspect_ratio: str) -> torch.Tensor:
        if aspect_ratio not in self._uncond_cache:
            self._uncond_cache[aspect_ratio] = load_uncond(self.cfg.data, aspect_ratio if self.cfg.mix_aspect else None)
        return self._uncond_cache[aspect_ratio]

    def micro_step(self, batch: dict[str, Any], scale: float, sync: bool, micro_index: int = 0) -> dict[str, torch.Tensor]:
        """Forward + backward on one micro-batch; gradients are scaled by ``scale`` and accumulate.

        ``micro_index`` is the micro-batch's place in the step (gradient accumulation); with the rank it
        gives the global index of each sample, which seeds its random draws (:mod:`starflow.train.recipe`).
        """
        first = (micro_index * self.dist.world_size + self.dist.rank) * len(batch["text"])
        data = self.recipe.prepare(batch, self.step, first)
        x, drop = self.recipe.noised(data.latents, self.step, first)
        if data.cached_text is not None:  # a latent cache: templated captions encoded once; dropped ones -> ""
            uncond = [self._uncond(a) for a in batch["aspect_ratio"]]
            y = torch.stack([u if d else t for t, u, d in zip(data.cached_text, uncond, drop)]).to(self.dist.device)
        elif self.text_encoder is not None:
            prompts = self.recipe.prompts(data.captions, batch["aspect_ratio"], data.fps, drop)
            y = self.text_encoder.encode_templated(data.captions, prompts).to(self.dist.device)
        else:
            y = None
        if self.denoiser is not None:
            x.requires_grad_(True)  # dL/dx is the denoiser's training target
        with gradient_sync(self.train_model, sync):
            with self._autocast():
                # the wrapper's forward (DDP hooks); cond_noise_level weights the likelihood, and the denoiser's
                # target follows it (SPEC 16)
                losses = self.model.loss_from_output(self.train_model(x, y), nll_weight=self.recipe.loss_weight)
            (losses["loss"] * scale).backward()
            out = {k: v.detach() for k, v in losses.items() if v.dim() == 0}
            if self.denoiser is not None:
                target = self.cfg.noise_std * x.numel() * x.grad / scale  # noise_std * numel(x) * dL/dx
                with self._autocast():
                    pred = self.model.denoiser(x.detach(), y)
                denoiser_loss = torch.nn.functional.mse_loss(pred.float(), target)
                (denoiser_loss * scale).backward()
                out["denoiser_loss"] = denoiser_loss.detach()
        return out

    def _denoiser_grad_norm(self) -> float:
        """Average the denoiser's gradients over ranks (FSDP2 already did) and clip them; returns their norm."""
        params = [p for p in self.denoiser.parameters() if p.grad is not None]
        if not self.sharded:
            all_reduce_grads(params, self.dist.world_size)
        return clip_grad_norm(params, self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf"))

    def _denoiser_step(self, apply: bool) -> None:
        """Step the denoiser's optimizer (``apply``: the step was not skipped and its gradients are finite), drop its
        gradients and move its schedule on."""
        if apply:
            self.denoiser_optimizer.step()
        self.denoiser_optimizer.zero_grad(set_to_none=True)
        self.denoiser_schedule.step()

    def _mean_over_ranks(self, metrics: dict[str, float]) -> dict[str, float]:
        if not self.dist.distributed:
            return metrics
        keys = sorted(metrics)
        values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=self.dist.device)
        torch.distributed.all_reduce(values)
        return dict(zip(keys, (values / self.dist.world_size).tolist()))

    def train_step(self, batches: list[dict[str, Any]]) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches; non-finite or (with grad_skip) too large
        gradients are skipped and counted, never applied. A skipped step changes neither the flow nor the learned
        denoiser (grad_skip looks at both gradient norms); a denoiser with non-finite gradients is not stepped.

        Raises:
            TrainingDiverged: ``max_nonfinite`` consecutive steps were non-finite. No checkpoint is written (the
                weights may be wrecked by the update before them, and a new checkpoint would push older ones out of
                ``keep_last``): the message names the latest one, which is from before the first of those steps (the
                loop writes none while they last).
        """
        self.train_model.train()
        outs = [self.micro_step(batch, 1.0 / len(batches), sync=i == len(batches) - 1, micro_index=i)
                for i, batch in enumerate(batches)]
        # one device-to-host copy per step, after every micro-batch is queued (not a sync per value)
        keys = list(outs[0])
        values = torch.stack([torch.stack([o[k].detach().float() for k in keys]) for o in outs]).cpu().tolist()
        metrics = {k: 0.0 for k in keys}
        for row in values:  # averaged in float64, micro-batch by micro-batch
            for k, v in zip(keys, row):
                metrics[k] += v / len(batches)
        metrics = self._mean_over_ranks(metrics)
        denoiser_norm = self._denoiser_grad_norm() if self.denoiser is not None else None
        params = [p for p in self.flow_params if p.grad is not None]  # the flow's own norm (the denoiser has its own)
        grad_norm = clip_grad_norm(params, self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf"))
        nonfinite = not math.isfinite(grad_norm) or not math.isfinite(metrics["loss"])
        skip = nonfinite
        if self.cfg.grad_skip and self.cfg.grad_clip > 0 and self.step >= GRAD_SKIP_AFTER:
            # a skipped step is skipped for the flow and the denoiser alike, whichever gradient was too large
            skip = skip or grad_norm > self.cfg.grad_clip or (denoiser_norm or 0.0) > self.cfg.grad_clip
        if skip:
            self.skipped_updates += 1
        else:
            self.optimizer.step()
        if self.denoiser is not None:
            self._denoiser_step(apply=not skip and math.isfinite(denoiser_norm))
        if nonfinite and not self.nonfinite_in_a_row:
            self.first_nonfinite_step = self.step + 1  # (the step being taken)
        self.nonfinite_in_a_row = self.nonfinite_in_a_row + 1 if nonfinite else 0
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step applied (logged), before the schedule moves on
        with warnings.catch_warnings():  # a skipped first step moves the schedule on all the same (on purpose)
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            self.schedule.step()
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.step)
        metrics.update(grad_norm=grad_norm, lr=lr, skipped=float(skip),
                       skipped_total=float(self.skipped_updates))
        if denoiser_norm is not None:
            metrics["denoiser_grad_norm"] = denoiser_norm
        if self.cfg.max_nonfinite and self.nonfinite_in_a_row >= self.cfg.max_nonfinite:
            latest = self.checkpoints.latest()
            start = (f"resumes from {latest}, from before them" if latest is not None else
                     f"starts again from {'init_from' if self.cfg.init_from else 'the initial weights'}: no checkpoint "
                     "was written before them")
            raise TrainingDiverged(
                f"{self.nonfinite_in_a_row} consecutive steps (steps {self.first_nonfinite_step} to {self.step}) had a "
                "non-finite loss or gradient and were skipped; stopping without a checkpoint (the update before them "
                "may have wrecked the weights). Lower 'lr', set 'grad_clip', or check the data, then run the same "
                f"command again: it {start} (config key 'max_nonfinite' sets the limit, 0 never stops)", metrics)
        return metrics

    # ------------------------------------------------------------------ loop
    def _epoch_batches(self, dataset, sampler: ResumableBatchSampler, stream: int = 0):
        """:func:`_worker_batches` of one epoch of a folder dataset (``sampler.epoch``, from ``sampler.skip``)."""
        # A private generator: the loader's worker seeds must not consume the global RNG (exact resume).
        gen = torch.Generator().manual_seed(self.cfg.seed + 1000 * sampler.epoch + self.dist.rank + 7919 * stream)
        if hasattr(dataset, "set_epoch"):  # per-epoch clip draws (start, rate) of a video folder
            dataset.set_epoch(sampler.epoch)
        skipped = getattr(dataset, "skipped", None)  # a set of names (images), or names -> reasons (videos)
        if isinstance(skipped, (set, dict)):  # each epoch's new workers know the files found bad (and do not say so
            if id(dataset) not in self._dataset_files:  # again; the secondary images' are its own)
                self._dataset_files[id(dataset)] = {str(p) for p in dataset.paths}
            known = self.skipped_files.difference(skipped) & self._dataset_files[id(dataset)]
            skipped.update(dict.fromkeys(known, "unreadable (found in an earlier epoch)"))  # (a set takes the names)
        return _worker_batches(dataset, self.cfg.num_workers, batch_sampler=sampler, collate_fn=collate,
                               persistent_workers=False, generator=gen, pin_memory=self._pin_memory)

    def _note_skipped(self, files) -> None:
        """Record data files found unreadable or missing (a batch's ``"skipped"``, a dataset's ``skipped``)."""
        new = set(files) - self.skipped_files
        if new and self.step > 0:
            self._log(f"skipping {len(new)} unreadable data file(s), e.g. {sorted(new)[0]}")
        self.skipped_files |= new

    def skipped_images(self) -> int:
        """Data files skipped so far (missing or unreadable), over all ranks (a collective when distributed: the
        file names are gathered only when some rank met a new one, as a folder's missing files can be millions)."""
        if not self.dist.distributed:
            return len(self.skipped_files)
        grew = torch.tensor([float(len(self.skipped_files) != self._skipped_seen)], device=self.dist.device)
        torch.distributed.all_reduce(grew, op=torch.distributed.ReduceOp.MAX)
        if grew.item():
            every: list[set[str]] = [set() for _ in range(self.dist.world_size)]
            torch.distributed.all_gather_object(every, self.skipped_files)
            self._skipped_total = len(set().union(*every))
        self._skipped_seen = len(self.skipped_files)
        return self._skipped_total

    def _folder_batches(self, dataset, sampler: ResumableBatchSampler, stream: int = 0) -> Iterator[dict[str, Any]]:
        while True:
            with self._epoch_batches(dataset, sampler, stream) as batches:
                for batch in batches:
                    sampler.skip += 1
                    self._note_skipped(batch.pop("skipped", ()))
                    yield batch
            sampler.epoch += 1
            sampler.skip = 0

    def _batches(self) -> Iterator[dict[str, Any]]:
        """The endless micro-batches of the training data (``cfg.data``)."""
        if self.stream is not None:  # webdataset shards: an endless stream, positions tracked per worker
            with _worker_batches(self.stream, self.cfg.num_workers, batch_size=None,
                                 pin_memory=self._pin_memory) as batches:
                for batch in batches:
                    self.tracker.update(batch.pop("position"))
                    self._note_skipped(batch.pop("skipped", ()))
                    if not self.sample_prompts:
                        self.sample_prompts = sorted(set(batch["text"]))[:SAMPLE_PROMPTS]
                    yield batch
        yield from self._folder_batches(self.dataset, self.batches)

    def _secondary_step(self, step: int) -> bool:
        """Whether optimizer step ``step`` trains on the secondary images (``secondary_ratio``; one draw per step,
        the same on every rank)."""
        if self.secondary is None:
            return False
        gen = torch.Generator().manual_seed(sample_seed(self.cfg.seed, step, "secondary"))
        return bool(torch.rand((), generator=gen) < self.cfg.secondary_ratio)

    def _data_position(self) -> dict[str, Any]:
        if self.stream is not None:
            out = {"stream": self.tracker.state_dict(), "num_workers": self.cfg.num_workers, "micro_batch": self.micro,
                   "stream_version": STREAM_VERSION}
        else:
            out = {"epoch": self.batches.epoch, "skip": self.batches.skip}
        if self.secondary_batches is not None:
            out["secondary"] = {"epoch": self.secondary_batches.epoch, "skip": self.secondary_batches.skip}
        return out

    def _set_data_position(self, position: dict[str, Any], path: Path, meta: dict[str, Any]) -> None:
        # a folder's position counts this rank's micro-batches, grad_accum per optimizer step: the steps taken in the
        # epoch are what carries over to another grad_accum (the global batches do not depend on it)
        saved = meta.get("config", {})
        saved_accum = max(1, int(saved.get("grad_accum", 1)))

        def micro_batches(skip: int, key: str = "batch_size") -> int:
            steps = skip // saved_accum
            before = saved.get(key) or saved.get("batch_size") or self.cfg.batch_size
            now = getattr(self.cfg, key) or self.cfg.batch_size
            if before != now and steps:  # another global batch forms this epoch's batches anew: skip by samples
                name = key if saved.get(key) or getattr(self.cfg, key) else "batch_size"
                self._log(f"{path}: {name} {before} -> {now} in mid-epoch: this epoch's batches are formed anew, and "
                          f"the run skips {steps * before // now} of them, as many samples as the {steps * before} "
                          "consumed (other ones), so until the next epoch some samples repeat and others wait (resume "
                          f"with {name} {before} for the exact order)")
                steps = steps * before // now
            return steps * self.cfg.grad_accum

        if self.secondary_batches is not None and "secondary" in position:
            self.secondary_batches.epoch = position["secondary"]["epoch"]
            self.secondary_batches.skip = micro_batches(position["secondary"]["skip"], "secondary_batch_size")
        if ("stream" in position) != (self.stream is not None):  # the data changed kind (e.g. a folder packed)
            self._log(f"{path}: its data position is for {'shards' if 'stream' in position else 'a folder'}, this run "
                      f"reads {'shards' if self.stream is not None else 'a folder'}; the data starts from its "
                      "beginning (model, optimizer and step resume)")
            return
        if self.stream is None:  # global batches: exact on any number of ranks and any grad_accum
            self.batches.epoch, self.batches.skip = position["epoch"], micro_batches(position["skip"])
            return
        state = position["stream"]
        old = self._stream_layout(position, meta)
        new = (self.dist.world_size, max(1, self.cfg.num_workers), self.micro)
        # written before the split of the current stream version (fewer shards than slots were dealt otherwise)
        legacy = position.get("stream_version", 1) < STREAM_VERSION and len(self.stream.shards) < new[0] * new[1]
        if old != new or legacy:  # the old split of each epoch into slots no longer applies: continue by samples
            saved = [dict(self.checkpoints.load_local(path, r)["data"], micro_batch=old[2])
                     for r in range(meta["world_size"])]
            state = continue_positions(saved, num_samples=self.stream.num_samples, world_size=new[0],
                                       num_workers=new[1], batch_size=new[2])
            epoch, skip = state["positions"]["0"]
            split = "an earlier split of its shards, " if legacy else ""
            self._log(f"{path}: the shard stream was saved by {old[0]} rank(s) x {old[1]} worker(s) with {split}"
                      f"micro-batches of {old[2]}, this run has {new[0]} x {new[1]} and {new[2]}; it continues "
                      f"by the samples consumed, at epoch {epoch} with {skip} batch(es) of each worker skipped. Until "
                      f"epoch {epoch + 1} some samples may repeat and others wait"
                      + (" (resume with the old layout for the exact stream)" if old != new else ""))
        self.tracker.load_state_dict(state)
        self.stream.set_position(**state)

    @staticmethod
    def _stream_layout(position: dict[str, Any], meta: dict[str, Any]) -> tuple[int, int, int]:
        """``(ranks, DataLoader workers (0 counts as 1), micro-batch)`` that wrote a checkpoint's shard positions."""
        saved = meta["config"]
        micro = position.get("micro_batch",  # older checkpoints: from their config
                             saved["batch_size"] // (meta["world_size"] * saved.get("grad_accum", 1)))
        return meta["world_size"], max(1, int(position["num_workers"])), int(micro)

    def _log(self, message: str) -> None:
        if self.dist.is_main:
            tqdm.write(message)

    def fit(self, max_steps: int | None = None, dry_run: bool = False) -> list[dict[str, float]]:
        """Train until ``cfg.steps`` (or ``max_steps`` more steps); returns the metrics of each step, the last
        :data:`HISTORY_STEPS` of them (``metrics.jsonl`` holds every logged step).

        With ``dry_run`` one step runs and nothing is written. A run that fails before its first step in a logdir
        it created (unreadable data, say) removes that logdir again. The config's ``init_from`` weights are loaded
        first (:meth:`initialise_from`) unless a :meth:`resume` / :meth:`load` or ``initialise_from`` already ran.

        Raises:
            TrainingStopped: SIGTERM or SIGINT arrived; the step in progress finished and a checkpoint was written
                (the CLI exits with ``128 + signal``).
            TrainingDiverged: the loss stayed non-finite (see :meth:`train_step`).
        """
        cfg = self.cfg
        if self.init_pending:
            self.initialise_from(cfg.init_from)
        end = self.step + 1 if dry_run else min(cfg.steps, self.step + (max_steps or cfg.steps))
        created = self.dist.is_main and not dry_run and not self.logdir.exists()
        lock = FolderLock(self.logdir, "training logdir", " (or pass another --logdir)")
        if self.dist.is_main and not dry_run:
            self.logdir.mkdir(parents=True, exist_ok=True)
            lock.acquire()  # one run per logdir (the other ranks stop when torchrun sees this one fail)
            save_config(cfg, self.logdir / "config.yaml")
            if isinstance(self.text_encoder, LabelEncoder):  # the run's folder holds its classes (starflow export)
                self.text_encoder.save_pretrained(self.logdir)
        history: collections.deque[dict[str, float]] = collections.deque(maxlen=HISTORY_STEPS)  # (bounded memory)
        if cfg.sample_freq and not dry_run:
            self._log(f"sample grids every {cfg.sample_freq} epoch(s) of {self.steps_per_epoch} steps (sample_freq), "
                      "and at the last step")
            # a run killed between its checkpoint and its grid: the grid of the step it resumes at (rank 0's folder
            # decides for every rank, as every rank samples with sharded layers)
            if self._grid_due(self.step, cfg.steps) and from_rank0(lambda: not self._grid_path().exists()):
                self.sample_grid()
        logger = MetricsLogger(self.logdir, cfg.to_dict(), enabled=self.dist.is_main and not dry_run,
                               start_step=self.step)
        data = self._batches()
        secondary = self._folder_batches(self.secondary, self.secondary_batches, 1) if self.secondary else None
        bar = tqdm(total=end, initial=self.step, disable=not self.dist.is_main, desc="train", dynamic_ncols=True)
        # samples_per_s: over the steps since the last logged one (checkpointing and sample grids left out);
        # elapsed_s: wall time of the training loop (steps, checkpoints, grids), continued across resumes
        t0 = window_start = time.perf_counter()
        elapsed_before = self.elapsed_s
        window_seen = 0
        stop = StopSignals(verbose=self.dist.is_main, at="after this step, with a checkpoint")
        if not dry_run:
            stop.install()
        try:
            while self.step < end:
                on_secondary = self._secondary_step(self.step)
                source = secondary if on_secondary else data
                try:
                    m = self.train_step([next(source) for _ in range(cfg.grad_accum)])
                except TrainingDiverged as e:  # its last step is logged (and the logdir kept, with its metrics)
                    history.append(dict(e.metrics, step=self.step))
                    logger.log(self.step, history[-1])
                    raise
                if self.secondary is not None:
                    m["secondary"] = float(on_secondary)
                window_seen += (cfg.secondary_batch_size or cfg.batch_size) if on_secondary else cfg.batch_size
                now = time.perf_counter()
                self.elapsed_s = elapsed_before + now - t0
                m.update(step=self.step, samples_per_s=window_seen / (now - window_start), elapsed_s=self.elapsed_s)
                history.append(m)
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.4f}", bpd=f"{m['bits_per_dim']:.3f}", lr=f"{m['lr']:.2e}",
                                samples_s=f"{m['samples_per_s']:.1f}")
                if dry_run:
                    break
                if self.step % cfg.log_freq == 0 or self.step == end:
                    m["peak_mem_gib"] = peak_memory_gib(self.dist.device)
                    m["skipped_images"] = float(self.skipped_images())
                    logger.log(self.step, m)
                # (none while non-finite steps last, the last step's neither: one from before them stays the latest)
                bad = bool(self.nonfinite_in_a_row)
                saved = not bad and (self.step % cfg.save_freq == 0 or self.step == end)
                if bad and self.step == end:
                    self._log(f"no checkpoint at the last step: its last {self.nonfinite_in_a_row} step(s) were "
                              "non-finite (the model folder holds the weights from before them)")
                paused = time.perf_counter()
                if saved:  # (before the sample grid: what is trained is kept first)
                    self.save()
                if self._grid_due(self.step, end):
                    self.sample_grid()
                if self.step % cfg.log_freq == 0:
                    window_start, window_seen = time.perf_counter(), 0
                else:  # a checkpoint or grid between logged steps is not training time either
                    window_start += time.perf_counter() - paused
                signum = agreed_stop(stop, self.dist.device)
                if signum:
                    if not saved and not bad:
                        self.save()
                    raise TrainingStopped(signum, self.step, saved=not bad)
        except BaseException:
            if created and not history and self.checkpoints.latest() is None:  # refused before its first step
                # (e.g. unreadable data): leave no logdir; one with a checkpoint or a logged step (a diverged run's)
                # stays
                logger.close()
                shutil.rmtree(self.logdir, ignore_errors=True)
            raise
        finally:
            for batches in (data, secondary):  # their workers stop now, not when a traceback is freed (they leave
                getattr(batches, "close", lambda: None)()  # SIGTERM to this process, and Python's exit would wait)
            stop.restore()
            bar.close()
            logger.close()
            lock.release()
        if self.skipped_updates:
            self._log(f"{self.skipped_updates} updates skipped (non-finite or above grad_clip)")
        skipped = self.skipped_images()
        if skipped:
            few = ", ".join(sorted(self.skipped_files)[:3])
            self._log(f"{skipped} data file(s) skipped (missing or unreadable; logged as skipped_images in "
                      f"metrics.jsonl), e.g. {few}")
        return list(history)

    def export(self, folder: str | Path) -> Path | None:
        """Write a model folder (``config.yaml``, ``model.safetensors`` in the official layout, and with
        ``ema`` the averaged weights as ``ema.safetensors``) from the current weights; every rank must call it
        under FSDP2, rank 0 writes."""
        weights = full_state_dict(self.model)
        ema = self.ema.full_state_dict(weights) if self.ema is not None else None
        if not self.dist.is_main:
            return None
        adapters = None
        if self.lora:  # plain official-layout weights with the adapters folded in, and the adapters beside them
            adapters = {k: v for k, v in weights.items() if LORA_MARK in k}
            weights = merge_lora_state(weights, self.cfg)
        text_encoder = self.text_encoder
        if isinstance(text_encoder, TextEncoder) and is_sharded(text_encoder.encoder):  # frozen: an unsharded copy is the same
            if text_encoder.name == TINY_TEXT_ENCODER:
                text_encoder = build_text_encoder(self.cfg, device="cpu")
            elif Path(text_encoder.name).is_dir():  # copied into the model folder
                text_encoder = TextEncoder.from_pretrained(text_encoder.name, max_length=self.cfg.txt_size)
        extra = {name: tensors for name, tensors in ((EMA_WEIGHTS, ema), (ADAPTER_WEIGHTS, adapters))
                 if tensors is not None}
        Pipeline(self.model, text_encoder, self.vae, self.cfg).save_pretrained(folder, weights=weights, extra=extra)
        return Path(folder)

    def _grid_due(self, step: int, end: int) -> bool:
        """Whether step ``step`` of a run ending at ``end`` draws a sample grid (config key ``sample_freq``, in epochs)."""
        every = self.cfg.sample_freq * self.steps_per_epoch
        return bool(self.cfg.sample_freq) and step > 0 and (step % every == 0 or step == end)

    def _grid_path(self) -> Path:
        return self.logdir / "samples" / f"step_{self.step:08d}.png"

    @torch.no_grad()
    def sample_grid(self, per_prompt: int = 4) -> Path | None:
        """Sample ``per_prompt`` images (videos: a filmstrip of 4 frames each) for a fixed set of training captions into
        ``samples/step_X.png``.

        With the flow or the T5 sharded (FSDP2) every rank samples (the sharded layers need all ranks; with DDP and
        ``fsdp_text_encoder: 1`` too) and rank 0 writes the grid.
        """
        every_rank = self.sharded or self.text_sharded
        if not (self.dist.is_main or every_rank):
            return None
        # rank 0's prompts on every rank: from shards each rank took them from its own first batch, and ranks that
        # sampled different prompts (or batch sizes) would call the sharded layers a different number of times
        captions = from_rank0(lambda: list(self.sample_prompts)) if every_rank else self.sample_prompts
        if not captions:
            return None
        was_training = self.model.training
        if self.sharded:  # FSDP2 must have gathered the layers outside inference mode once (a resumed run may draw
            # its grid before any step), or their gathered weights become inference tensors and every step fails
            with torch.no_grad():
                prepare_sharded_inference(self.model, self.cfg.txt_size, getattr(self.text_encoder, "hidden_size", None),
                                          self.dist.device)
        pipe = Pipeline(self.model, self.text_encoder, self.vae, self.cfg)
        prompts = [p for p in captions for _ in range(per_prompt)]
        gen = torch.Generator().manual_seed(self.cfg.seed)
        rng = torch.get_rng_state()
        settings = SampleSettings(cfg=self.cfg.cfg, jacobi=True, temperature=self.cfg.temperature)
        pixels = pipe(prompts, settings, generator=gen)
        torch.set_rng_state(rng)  # sampling must not change the training noise stream
        self.model.train(was_training)
        if not self.dist.is_main:
            return None
        path = self._grid_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        width = pixels.shape[-1]
        if pixels.dim() == 5:  # videos: a filmstrip of frames per sample
            pixels = filmstrips(pixels)
        save_grid(pixels, path, nrow=per_prompt, scale=view_scale(width))
        return path
