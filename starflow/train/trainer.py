"""The training loop: the STARFlow recipe (arXiv 2506.06276, Sec. 4; SPEC section 14), resumable to the step.

``x = vae.encode(img) + noise_std * N(0, I)``, captions dropped to ``""`` with probability ``drop_label``,
AdamW (0.9, 0.95), warm-up + cosine, gradient clipping / skipping, bf16 autocast on CUDA. One process
or many under ``torchrun``; checkpoints restore model, optimizer, schedule, step, data position and RNG.

Video (STARFlow-V, arXiv 2511.20462): batches are ``(B, T, C, H, W)``; with probability ``drop_image`` a
batch loses its first frame and its captions get the ``(extend) `` prefix (SPEC section 11). The learnable
self-denoiser trains beside the flow with its own AdamW (``denoiser_lr``, weight decay 1e-4): its target
is ``noise_std * numel(x) * dL/dx`` (SPEC section 10), read from the flow's own backward pass (the noisy
latents require grad), so it costs one denoiser forward/backward and no second flow pass.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from starflow.adapters import LatentAdapter, TextEncoder, apply_prompt_template
from starflow.config import Config, save_config
from starflow.data import AspectBucketBatchSampler, ImageFolder, collate
from starflow.models import STARFlow
from starflow.sampling.io import save_grid
from starflow.sampling.pipeline import EXTEND_PREFIX, Pipeline, SampleSettings
from starflow.train.distributed import DistInfo
from starflow.train.optim import build_optimizer, build_schedule
from starflow.train.state import CheckpointManager, rng_state, set_rng_state

__all__ = ["Trainer", "ResumableBatchSampler", "GRAD_SKIP_AFTER"]

GRAD_SKIP_AFTER = 100  # grad_skip applies from this step on (SPEC section 14)
DENOISER_WEIGHT_DECAY = 1e-4  # SPEC section 10
SAMPLE_PROMPTS = 10  # captions in the periodic sample grid


class ResumableBatchSampler(Sampler[list[int]]):
    """Wraps a per-epoch batch sampler; remembers ``(epoch, batches consumed)`` to resume mid-epoch."""

    def __init__(self, sampler: AspectBucketBatchSampler) -> None:
        self.sampler, self.epoch, self.skip = sampler, 0, 0

    def __len__(self) -> int:
        return len(self.sampler) - self.skip

    def __iter__(self) -> Iterator[list[int]]:
        self.sampler.set_epoch(self.epoch)
        return itertools.islice(iter(self.sampler), self.skip, None)


class Trainer:
    """Trains a :class:`STARFlow` on a captioned image folder.

    Args:
        cfg: resolved config (``batch_size`` is global; each rank gets ``batch_size // world_size``).
        dist: this process's rank and device.
        model: the flow (possibly wrapped for data parallelism by the caller via :attr:`train_model`).
        text_encoder: frozen text encoder or None.
        vae: latent adapter.
        dataset: training images.
        logdir: output folder (checkpoints, samples, ``metrics.jsonl``, ``config.yaml``).
    """

    def __init__(self, cfg: Config, dist: DistInfo, model: STARFlow, text_encoder: TextEncoder | None,
                 vae: LatentAdapter, dataset: ImageFolder, logdir: Path) -> None:
        if cfg.batch_size % (dist.world_size * cfg.grad_accum):
            raise ValueError(f"config key 'batch_size' ({cfg.batch_size}) must be divisible by world size x grad_accum "
                             f"({dist.world_size} x {cfg.grad_accum})")
        self.cfg, self.dist, self.logdir = cfg, dist, Path(logdir)
        self.model, self.text_encoder, self.vae, self.dataset = model, text_encoder, vae, dataset
        self.train_model: torch.nn.Module = model
        if dist.distributed:
            if model.learnable_self_denoiser is not None:  # trained outside the flow's forward: synced by hand
                torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                    model, [n for n, _ in model.named_parameters() if n.startswith("learnable_self_denoiser.")])
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[dist.device] if dist.device.type == "cuda" else None)
        self.denoiser = model.learnable_self_denoiser
        den_ids = {id(p) for p in self.denoiser.parameters()} if self.denoiser is not None else set()
        self.optimizer = build_optimizer((p for p in model.parameters() if p.requires_grad and id(p) not in den_ids), cfg)
        self.denoiser_optimizer = None
        if self.denoiser is not None:
            self.denoiser_optimizer = build_optimizer(self.denoiser.parameters(), cfg, lr=cfg.denoiser_lr,
                                                      weight_decay=DENOISER_WEIGHT_DECAY)
        self.schedule = build_schedule(self.optimizer, cfg)
        self.step = 0
        self.skipped_updates = 0
        micro = cfg.batch_size // (dist.world_size * cfg.grad_accum)
        buckets = dataset.buckets
        self.batches = ResumableBatchSampler(AspectBucketBatchSampler(
            buckets, micro, shuffle=True, seed=cfg.seed, drop_last=True, rank=dist.rank, world_size=dist.world_size))
        if len(self.batches.sampler) == 0:
            raise ValueError(f"dataset of {len(dataset)} images is smaller than one batch of {micro} per rank")
        self.checkpoints = CheckpointManager(self.logdir / "checkpoints", cfg.keep_last)
        self.sample_prompts = sorted(set(dataset.texts))[:SAMPLE_PROMPTS]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: model, optimizer, schedule, step, data position, RNG, config."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "denoiser_optimizer": self.denoiser_optimizer.state_dict() if self.denoiser_optimizer else None,
                "schedule": self.schedule.state_dict(), "step": self.step, "skipped_updates": self.skipped_updates,
                "data": {"epoch": self.batches.epoch, "skip": self.batches.skip}, "rng": rng_state(),
                "config": self.cfg.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.denoiser_optimizer is not None and state.get("denoiser_optimizer"):
            self.denoiser_optimizer.load_state_dict(state["denoiser_optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.step, self.skipped_updates = state["step"], state.get("skipped_updates", 0)
        self.batches.epoch, self.batches.skip = state["data"]["epoch"], state["data"]["skip"]
        set_rng_state(state["rng"])

    def resume(self) -> bool:
        """Load the latest checkpoint in ``logdir`` if there is one; returns whether it did."""
        path = self.checkpoints.latest()
        if path is None:
            return False
        self.load_state_dict(CheckpointManager.load(path))
        self._log(f"resumed from {path} at step {self.step}")
        return True

    # ------------------------------------------------------------------ one step
    def _encode_text(self, captions: list[str], aspects: list[str]) -> torch.Tensor | None:
        if self.text_encoder is None:
            return None
        c = self.cfg
        drop = torch.rand(len(captions)) < c.drop_label
        fps = c.vid_size[1] if c.vid_size else 0
        texts = [apply_prompt_template("" if d else t, fps=fps, fps_cond=c.fps_cond, cond_noise_level=c.cond_noise_level,
                                       noise_std=c.noise_std, mix_aspect=c.mix_aspect, aspect_ratio=a)
                 for t, a, d in zip(captions, aspects, drop.tolist())]
        return self.text_encoder(texts).to(self.dist.device)

    def _autocast(self):
        if self.dist.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def micro_step(self, batch: dict[str, Any], scale: float, sync: bool) -> dict[str, torch.Tensor]:
        """Forward + backward on one micro-batch; gradients are scaled by ``scale`` and accumulate."""
        pixels = batch["pixels"].to(self.dist.device)
        captions = list(batch["text"])
        if pixels.dim() == 5 and pixels.shape[1] > 1 and self.cfg.drop_image > 0 and torch.rand(()) < self.cfg.drop_image:
            pixels = pixels[:, 1:]  # continue a video: no first frame, and the caption says so
            captions = [EXTEND_PREFIX + c for c in captions]
        with torch.no_grad():
            latents = self.vae.encode(pixels).float()
        noise = torch.randn(latents.shape).to(latents.device)
        x = latents + self.cfg.noise_std * noise
        y = self._encode_text(captions, batch["aspect_ratio"])
        if self.denoiser is not None:
            x.requires_grad_(True)  # dL/dx is the denoiser's training target
        no_sync = getattr(self.train_model, "no_sync", None)
        ctx = no_sync() if (no_sync is not None and not sync) else contextlib.nullcontext()
        with ctx:
            with self._autocast():
                losses = self.model.loss_from_output(self.train_model(x, y))  # the wrapper's forward (DDP hooks)
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

    def _denoiser_step(self) -> float:
        """Average the denoiser's gradients over ranks, clip, step its optimizer; returns the gradient norm."""
        params = [p for p in self.denoiser.parameters() if p.grad is not None]
        if self.dist.distributed:
            for p in params:
                torch.distributed.all_reduce(p.grad)
                p.grad /= self.dist.world_size
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, clip).item()
        if math.isfinite(norm):
            self.denoiser_optimizer.step()
        self.denoiser_optimizer.zero_grad(set_to_none=True)
        return norm

    def train_step(self, batches: list[dict[str, Any]]) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches; non-finite or (with grad_skip) too large
        gradients are skipped and counted, never applied."""
        self.train_model.train()
        metrics: dict[str, float] = {}
        for i, batch in enumerate(batches):
            out = self.micro_step(batch, 1.0 / len(batches), sync=i == len(batches) - 1)
            for k, v in out.items():
                metrics[k] = metrics.get(k, 0.0) + v.item() / len(batches)
        denoiser_norm = self._denoiser_step() if self.denoiser is not None else None
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip).item()
        skip = not math.isfinite(grad_norm) or not math.isfinite(metrics["loss"])
        if self.cfg.grad_skip and self.cfg.grad_clip > 0 and self.step >= GRAD_SKIP_AFTER:
            skip = skip or grad_norm > self.cfg.grad_clip
        if skip:
            self.skipped_updates += 1
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        self.step += 1
        metrics.update(grad_norm=grad_norm, lr=self.optimizer.param_groups[0]["lr"], skipped=float(skip))
        if denoiser_norm is not None:
            metrics["denoiser_grad_norm"] = denoiser_norm
        return metrics

    # ------------------------------------------------------------------ loop
    def _loader(self) -> DataLoader:
        # A private generator: the loader's worker seeds must not consume the global RNG (exact resume).
        gen = torch.Generator().manual_seed(self.cfg.seed + 1000 * self.batches.epoch + self.dist.rank)
        return DataLoader(self.dataset, batch_sampler=self.batches, collate_fn=collate,
                          num_workers=self.cfg.num_workers, persistent_workers=False, generator=gen)

    def _batches(self) -> Iterator[dict[str, Any]]:
        while True:
            for batch in self._loader():
                self.batches.skip += 1
                yield batch
            self.batches.epoch += 1
            self.batches.skip = 0

    def _log(self, message: str) -> None:
        if self.dist.is_main:
            tqdm.write(message)

    def fit(self, max_steps: int | None = None, dry_run: bool = False) -> list[dict[str, float]]:
        """Train until ``cfg.steps`` (or ``max_steps`` more steps); returns the logged metrics.

        With ``dry_run`` one step runs and nothing is written.
        """
        cfg = self.cfg
        end = self.step + 1 if dry_run else min(cfg.steps, self.step + (max_steps or cfg.steps))
        if self.dist.is_main and not dry_run:
            self.logdir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.logdir / "config.yaml")
        history: list[dict[str, float]] = []
        data = self._batches()
        bar = tqdm(total=end, initial=self.step, disable=not self.dist.is_main, desc="train", dynamic_ncols=True)
        t0, seen = time.perf_counter(), 0
        while self.step < end:
            m = self.train_step([next(data) for _ in range(cfg.grad_accum)])
            seen += cfg.batch_size
            m.update(step=self.step, samples_per_s=seen / (time.perf_counter() - t0))
            history.append(m)
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.4f}", bpd=f"{m['bits_per_dim']:.3f}", lr=f"{m['lr']:.2e}")
            if dry_run:
                break
            if self.dist.is_main and (self.step % cfg.log_freq == 0 or self.step == end):
                with open(self.logdir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(m) + "\n")
            if cfg.sample_freq and (self.step % cfg.sample_freq == 0 or self.step == end):
                self.sample_grid()
            if self.step % cfg.save_freq == 0 or self.step == end:
                self.save()
        bar.close()
        if self.skipped_updates:
            self._log(f"{self.skipped_updates} updates skipped (non-finite or above grad_clip)")
        return history

    def save(self) -> Path | None:
        if not self.dist.is_main:
            return None
        path = self.checkpoints.save(self.step, self.state_dict())
        return path

    @torch.no_grad()
    def sample_grid(self, per_prompt: int = 4) -> Path | None:
        """Sample ``per_prompt`` images for a fixed set of training captions into ``samples/step_X.png``."""
        if not self.dist.is_main or not self.sample_prompts:
            return None
        was_training = self.model.training
        pipe = Pipeline(self.model, self.text_encoder, self.vae, self.cfg)
        prompts = [p for p in self.sample_prompts for _ in range(per_prompt)]
        gen = torch.Generator().manual_seed(self.cfg.seed)
        rng = torch.get_rng_state()
        pixels = pipe(prompts, SampleSettings(cfg=self.cfg.cfg, jacobi=True), generator=gen)
        torch.set_rng_state(rng)  # sampling must not change the training noise stream
        self.model.train(was_training)
        path = self.logdir / "samples" / f"step_{self.step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_grid(pixels, path, nrow=per_prompt, scale=max(1, 64 // pixels.shape[-1]))
        return path
