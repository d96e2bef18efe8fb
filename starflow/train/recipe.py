"""The training recipe between a data batch and the flow's input (STARFlow Sec. 4, STARFlow-V; SPEC sections
11, 14 and 16): augmentation, data modes, VAE encoding, noise, caption dropout and the prompt template.

Every random draw is seeded by ``(seed, step, global sample index)`` (:func:`starflow.data.sample_seed`), so
the same config on 1 or N processes computes the same losses and a resumed run continues exactly:

* the step's ``drop_image`` draw: ``sample_seed(seed, step, -1)``;
* each sample's caption dropout, then its noise: ``sample_seed(seed, step, index)``;
* each sample's horizontal flip (unless ``no_flip``): ``sample_seed(seed, step, index, "flip")``.

Data modes of video configs (caption tag prepended before templating):

* ``drop_image`` (probability per step): the first frame is dropped, ``"(extend) "``;
* ``video_to_video``: clips hold ``2F`` frames, target then source; each half is encoded on its own and the
  latents are ``[source; target]`` along time, ``"(v2v) "``;
* ``last_frame_cond``: pixel frame ``F - t`` (:func:`end_frame_index`: ``F - 4`` for WAN2.2, the last frame for a
  VAE without a temporal factor) is encoded as one latent frame and put before the clip's latents, ``"(last) "``.

A batch of images in a video config (the secondary image data) trains as one-frame videos with ``fps 0``
(``"An image:"`` with ``fps_cond``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from starflow.adapters import LatentAdapter
from starflow.config import Config
from starflow.data import sample_seed
from starflow.models.starflow import noised_data
from starflow.prompts import EXTEND_PREFIX, LAST_FRAME_PREFIX, V2V_PREFIX, prompt_from_config

__all__ = ["Recipe", "Prepared", "NOISE_LEVEL_REFERENCE", "end_frame_index"]

NOISE_LEVEL_REFERENCE = 0.3
"""With ``cond_noise_level`` every sample's likelihood term is weighted by ``noise_std / 0.3`` (SPEC section 16; the
``latent_norm_regularization`` term is not)."""


def end_frame_index(frames: int, temporal_downsample: int) -> int:
    """The pixel frame a ``last_frame_cond`` clip of ``frames`` frames is conditioned on: the first frame of the last
    latent frame's group, ``F - t`` for a VAE of temporal factor ``t`` (SPEC section 16: ``F - 4`` for WAN2.2; the
    last frame, ``F - 1``, for pixel and image-VAE models)."""
    return frames - temporal_downsample


@dataclass
class Prepared:
    """A batch ready for noising: latents ``(B, [T,] C, H, W)`` float32, captions (tags included), the frame
    rate written into each prompt, and cached text embeddings ``(B, L, D)`` of a latent cache (else None)."""

    latents: torch.Tensor
    captions: list[str]
    fps: list[float]
    cached_text: torch.Tensor | None = None


class Recipe:
    """Turns data batches into the flow's noisy input and prompts for one config.

    Args:
        cfg: the training config.
        vae: the frozen latent adapter.
        device: where latents live.
    """

    def __init__(self, cfg: Config, vae: LatentAdapter, device: torch.device) -> None:
        self.cfg, self.vae, self.device = cfg, vae, device

    @property
    def loss_weight(self) -> float:
        """The factor of every sample's likelihood term: ``noise_std / 0.3`` with ``cond_noise_level``, else 1."""
        return self.cfg.noise_std / NOISE_LEVEL_REFERENCE if self.cfg.cond_noise_level else 1.0

    def drop_image(self, step: int) -> bool:
        """Whether step ``step`` drops the first frame of its clips (``drop_image``, one draw per step)."""
        step_gen = torch.Generator().manual_seed(sample_seed(self.cfg.seed, step, -1))
        return self.cfg.drop_image > 0 and bool(torch.rand((), generator=step_gen) < self.cfg.drop_image)

    def prepare(self, batch: dict[str, Any], step: int, first: int) -> Prepared:
        """Latents, captions and frame rates of a batch whose first sample has global index ``first``."""
        cfg, n = self.cfg, len(batch["text"])
        captions = list(batch["text"])
        fps = [float(f) for f in batch.get("fps", [cfg.fps] * n)]
        drop_image = self.drop_image(step)
        if "latents" in batch:  # a latent cache (starflow cache-latents)
            latents, text = batch["latents"].to(self.device, non_blocking=True).float(), batch.get("text_emb")
            if drop_image and latents.dim() == 5 and latents.shape[1] > 1:
                latents, text = latents[:, 1:], batch["text_emb_extend"]
            return Prepared(latents, captions, fps, text)
        pixels = batch["pixels"].to(self.device, non_blocking=True)  # (pinned by the loader on CUDA)
        if cfg.is_video and pixels.dim() == 4:  # secondary images: one-frame videos, "An image:"
            pixels, fps = pixels[:, None], [0.0] * n
        if not cfg.no_flip:
            flips = [bool(torch.rand((), generator=torch.Generator().manual_seed(
                sample_seed(cfg.seed, step, first + i, "flip"))) < 0.5) for i in range(n)]
            pixels = torch.stack([p.flip(-1) if f else p for p, f in zip(pixels, flips)])
        # the VAE's posterior draw of sample i: seeded by (seed, step, index) as its noise, on any number of ranks
        generators = [torch.Generator().manual_seed(sample_seed(cfg.seed, step, first + i, "vae")) for i in range(n)]

        def encode(x: torch.Tensor) -> torch.Tensor:
            return self.vae.encode(x, generator=generators)

        with torch.no_grad():
            if pixels.dim() == 5 and pixels.shape[1] > 1:
                if cfg.video_to_video:
                    half = pixels.shape[1] // 2  # stored target then source: train [source; target]
                    latents = torch.cat([encode(pixels[:, half:]), encode(pixels[:, :half])], 1)
                    return Prepared(latents.float(), [V2V_PREFIX + c for c in captions], fps)
                if cfg.last_frame_cond:
                    end = pixels[:, end_frame_index(pixels.shape[1], self.vae.temporal_downsample)][:, None]
                    latents = torch.cat([encode(end), encode(pixels)], 1)
                    return Prepared(latents.float(), [LAST_FRAME_PREFIX + c for c in captions], fps)
                if drop_image:  # continue a video: no first latent frame (SPEC section 16), and the caption says so
                    latents = encode(pixels)[:, 1:]  # (the VAE takes the whole 4k + 1 frames)
                    return Prepared(latents.float(), [EXTEND_PREFIX + c for c in captions], fps)
            return Prepared(encode(pixels).float(), captions, fps)

    def noised(self, latents: torch.Tensor, step: int, first: int) -> tuple[torch.Tensor, list[bool]]:
        """``(x, dropped captions)``: ``x = latents + noise_std * N(0, I)`` (``noise_type: uniform``: 8-bit
        dequantisation ``((x + 1) 127.5 + U[0, 1)) / 256 * 2 - 1``) and each sample's caption dropout."""
        cfg, dev = self.cfg, latents.device
        noise, dropout_draws = [], []
        draw = torch.rand if cfg.noise_type == "uniform" else torch.randn
        for i in range(latents.shape[0]):
            gen = torch.Generator(device=dev).manual_seed(sample_seed(cfg.seed, step, first + i))
            dropout_draws.append(torch.rand((), generator=gen, device=dev))
            noise.append(draw(latents.shape[1:], generator=gen, device=dev))
        drop = (torch.stack(dropout_draws) < cfg.drop_label).tolist()  # (one device-to-host copy a batch)
        return noised_data(latents, torch.stack(noise), cfg), drop

    def prompts(self, captions: list[str], aspects: list[str], fps: list[float], drop: list[bool]) -> list[str]:
        """The templated prompts (``""`` for dropped captions; SPEC section 12)."""
        return [prompt_from_config("" if d else c, self.cfg, a, fps=int(f))
                for c, a, f, d in zip(captions, aspects, fps, drop)]
