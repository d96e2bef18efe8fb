"""Helpers several test modules share: the tiny video config, a folder of real moving-digit clips, the training
command line under ``torchrun`` and its metrics, a DCP checkpoint read back whole, and a tiny video pipeline.

``conftest.py`` puts this folder on ``sys.path``, so test modules import it as ``helpers`` under any pytest
``--import-mode``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from starflow.adapters import build_latent_adapter, build_text_encoder
from starflow.config import load_config
from starflow.data.moving_digits import DIRECTIONS, moving_caption, render_clip
from starflow.data.video import write_video
from starflow.models import STARFlow
from starflow.sampling.pipeline import Pipeline

TINY_VIDEO = dict(img_size=8, vid_size="3:8", channel_size=1, patch_size=2, channels=32, top_block_channels=48,
                  head_dim=16, layers_per_block="1 2", rope=1, sos=1, seq_order="L2R", use_softplus=1,
                  cond_top_only=1, use_final_norm=1, soft_clip=4.0, temporal_causal=1, shallow_block_local=1,
                  learnable_self_denoiser=1, conditional_denoiser=1, denoiser_window=1, txt_size=48, text="tiny-t5",
                  vae="none", noise_std=0.3, drop_label=0.1, drop_image=0.5, lr=1e-3, min_lr=1e-5, denoiser_lr=1e-3,
                  warmup_steps=0, steps=3, batch_size=4, grad_clip=1.0, num_workers=0, log_freq=1, save_freq=3,
                  sample_freq=0, keep_last=1, seed=0, no_flip=1)
"""YAML keys of a tiny pixel-space STARFlow-V (3 frames of 8x8 greyscale, no VAE); copy before changing."""


def clip_folder(root: Path, n: int = 8, frames: int = 6) -> Path:
    """``n`` real moving-digit clips (train-split digits, 8x8, 8 fps, lossless MP4) with ``metadata.jsonl``."""
    from starflow.data.digits import load_digit_split

    images, labels = load_digit_split("train")
    lines = []
    for i in range(n):
        direction = list(DIRECTIONS)[i % 4]
        write_video(root / f"{i}.mp4", render_clip(images[i], frames, 8, (i, 2 * i), direction), 8, lossless=True)
        lines.append(json.dumps({"file_name": f"{i}.mp4", "text": moving_caption(int(labels[i]), direction), "fps": 8}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def run_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The environment of a training subprocess: its own TMPDIR, one thread, offline."""
    return dict(os.environ, TMPDIR=str(tmp), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **extra)


def train_cmd(config: Path, logdir: Path, nproc: int, *extra: str, torchrun: bool | None = None) -> list[str]:
    """The training command line; under torchrun for several processes (or with ``torchrun``)."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] \
        if (nproc > 1 if torchrun is None else torchrun) else [sys.executable]
    return [*launch, "-m", "starflow.cli", "train", "--config", str(config), "--logdir", str(logdir),
            "--device", "cpu", *extra]


def losses(logdir: Path) -> dict[int, dict[str, float]]:
    """Metrics by step; a step logged again after a resume replaces the earlier line."""
    lines = (logdir / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m for m in map(json.loads, lines)}


def read_checkpoint(path: Path, tmp: Path) -> dict[str, Any]:
    """Everything in a DCP training checkpoint as one plain dict (plus ``trainer.json`` under ``meta``)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(path, tmp / "consolidated.pt")
    state = torch.load(tmp / "consolidated.pt", weights_only=False)
    state["meta"] = json.loads((path / "trainer.json").read_text())
    return state


def video_pipeline(**overrides) -> Pipeline:
    """The tiny video config (with ``overrides``) as a pipeline, output layers perturbed: a non-trivial flow."""
    cfg = load_config(dict(TINY_VIDEO, **overrides))
    torch.manual_seed(0)
    model = STARFlow.from_config(cfg, txt_dim=32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proj_out.weight" in name or "final_norm.weight" in name:
                p.add_(0.05 * torch.randn_like(p))
    return Pipeline(model, build_text_encoder(cfg), build_latent_adapter("none", channels=1), cfg)
