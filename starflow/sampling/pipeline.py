"""Text -> pixels: text encoder, flow sampling with guidance and Jacobi iteration, denoising, VAE decoding.

A *model folder* holds ``config.yaml`` (official format), the flow weights (``model.safetensors`` or a
``.pth`` in the official layout) and, for small models, a ``text_encoder/`` folder. Relative paths in
the config's ``text`` and ``vae`` keys are resolved against the config's folder first.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from starflow.adapters import LabelEncoder, LatentAdapter, TextEncoder, build_text_encoder, build_vae
from starflow.assets import TINY_TEXT_ENCODER, find_weights
from starflow.checkpoint import load_weights, save_weights
from starflow.config import Config, load_config, save_config
from starflow.data.aspect import aspect_to_size
from starflow.distributed import any_rank, is_sharded, load_sharded, prepare_sharded_inference
from starflow.models import STARFlow
from starflow.models.jacobi import JACOBI_BLOCK_SIZE, JACOBI_MAX_ITER, JACOBI_THRESHOLD, DecodeStats
from starflow.prompts import EXTEND_PREFIX, prompt_from_config
from starflow.sampling.denoise import learned_denoise, self_denoise

__all__ = ["Pipeline", "SampleSettings", "Profile"]

DEFAULT_CONTEXT_FRAMES = 16  # latent frames carried into each new window of a long video (SPEC section 11)
PREFIX_SEED_OFFSET = 1_000_003  # the image prefix's noise seed: the sample's seed plus this


@dataclass
class SampleSettings:
    """Sampling options (names as the official ``sample.py`` flags)."""

    cfg: float = 0.0
    jacobi: bool = True
    jacobi_th: float = JACOBI_THRESHOLD  # the official scripts use 1e-3 (images: block 16, video: block 32)
    jacobi_block_size: int = JACOBI_BLOCK_SIZE
    jacobi_max_iter: int = JACOBI_MAX_ITER
    aspect_ratio: str = "1:1"
    self_denoise: bool = True
    anneal_guidance: bool = False
    jacobi_stop: str = "sample"  # "sample": results independent of batch and ranks; "batch": the official rule
    target_length: int | None = None  # video: pixel frames to generate (default: the config's vid_size frames)
    context_length: int | None = None  # video: latent frames carried into each new window (default min(16, W - 1))


@dataclass
class Profile:
    """Seconds (and sequential flow evaluations) spent per stage (``starflow sample --profile``).

    Stages are named as they run: ``"text encoding"``, one per flow block (``"flow block 3 (deep)"`` ...),
    ``"denoising"``, ``"VAE decoding"`` (and ``"VAE encoding"`` for image-to-video). On CUDA each stage is
    bracketed by device synchronisations, so the times are the GPU's.
    """

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    evaluations: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    @contextmanager
    def stage(self, name: str, device: torch.device, stats: DecodeStats | None = None):
        """Time the block as stage ``name``; with ``stats``, also count its sequential flow evaluations."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start, evals = time.perf_counter(), stats.evaluations if stats is not None else 0
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.seconds[name] += time.perf_counter() - start
        if stats is not None:
            self.evaluations[name] += stats.evaluations - evals

    def table(self) -> str:
        """One line per stage: seconds, share of the total, sequential flow evaluations."""
        total = sum(self.seconds.values()) or 1.0
        lines = [f"{'stage':<24}{'seconds':>10}{'share':>8}{'evals':>8}"]
        for name, sec in self.seconds.items():
            evals = str(self.evaluations[name]) if name in self.evaluations else ""
            lines.append(f"{name:<24}{sec:>10.3f}{sec / total:>8.1%}{evals:>8}".rstrip())
        lines.append(f"{'total':<24}{sum(self.seconds.values()):>10.3f}")
        return "\n".join(lines)


class Pipeline:
    """Flow + text encoder + latent adapter, sampling images from prompts.

    Args:
        model: the flow (eval mode).
        text_encoder: frozen text encoder, or None for an unconditional model.
        vae: latent adapter (identity for pixel models).
        config: the model's config (prompt template flags, ``noise_std``, sizes).
    """

    def __init__(self, model: STARFlow, text_encoder: TextEncoder | None, vae: LatentAdapter, config: Config) -> None:
        self.model, self.text_encoder, self.vae, self.config = model.eval(), text_encoder, vae, config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def from_pretrained(cls, folder_or_weights: str | Path, config: str | Path | Config | None = None,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        asset_dir: str | Path | None = None, shard: bool = False, ema: bool = False) -> "Pipeline":
        """Load a model folder, or a weights file with its config.

        Args:
            folder_or_weights: a model folder (config.yaml + weights), or a ``.pth``/``.safetensors``.
            config: YAML path or Config; default ``config.yaml`` beside the weights.
            device, dtype: where and in which precision to run the flow.
            asset_dir: folder against which relative ``text``/``vae`` paths resolve (default: the config
                file's folder, or the weights' folder when ``config`` is a Config object).
            shard: shard the flow over the ranks of ``torch.distributed`` with FSDP2 (each rank holds
                ``1/N`` of the weights; every rank must then sample the same number of batches).
            ema: with a model folder, load its moving-average weights (``ema.safetensors``).

        Raises:
            FileNotFoundError: weights, config, text encoder or VAE not found (with how to get them).
            CheckpointError: the weights file is corrupt or truncated, or its names/shapes differ from the
                config's model (every difference listed); nothing is half-loaded.
        """
        path = Path(folder_or_weights)
        weights = find_weights(path, ema=ema) if path.is_dir() else path
        if not weights.is_file():
            raise FileNotFoundError(f"checkpoint not found: {weights} (official weights: Hugging Face repo apple/starflow)")
        base_dir = weights.parent
        if config is None:
            config = base_dir / "config.yaml"
            if not config.is_file():
                raise FileNotFoundError(f"no config.yaml beside {weights}: pass the config (--model_config_path)")
        if asset_dir is not None:
            base_dir = Path(asset_dir)
        elif not isinstance(config, Config):
            base_dir = Path(config).parent
        cfg = load_config(config)
        device = torch.device(device)
        dirs = (base_dir, weights.parent)
        vae = build_vae(cfg, *dirs, device=device)
        text_encoder = build_text_encoder(cfg, *dirs, device=device)
        txt_dim = text_encoder.hidden_size if text_encoder is not None else None
        with torch.device("meta"):
            model = STARFlow.from_config(cfg, txt_dim=txt_dim, vae_downsample=vae.downsample)
        if shard:
            load_sharded(model, weights, device, dtype)
            model.requires_grad_(False)
            prepare_sharded_inference(model, cfg.txt_size, txt_dim, device)
            return cls(model, text_encoder, vae, cfg)
        load_weights(model, str(weights), assign=True, dtype=dtype)
        return cls(model.to(device).requires_grad_(False), text_encoder, vae, cfg)

    def save_pretrained(self, folder: str | Path, weights: Mapping[str, torch.Tensor] | None = None) -> None:
        """Write a model folder: ``config.yaml``, ``model.safetensors`` (official layout) and, for the tiny
        preset text encoder, ``text_encoder/`` (the config then points at it; a class vocabulary is copied
        beside the weights). ``weights`` replaces the
        model's own state dict (e.g. the gathered weights of a sharded model)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = self.config
        local_text = self.text_encoder is not None and Path(self.text_encoder.name).is_dir()
        if isinstance(self.text_encoder, LabelEncoder):  # the class vocabulary travels with the weights
            cfg = load_config(cfg, {"text": self.text_encoder.save_pretrained(folder).name})
        elif self.text_encoder is not None and (cfg.text == TINY_TEXT_ENCODER or local_text):
            self.text_encoder.save_pretrained(folder / "text_encoder")
            cfg = load_config(cfg, {"text": "text_encoder"})
        save_weights(self.model if weights is None else weights, folder / "model.safetensors")
        save_config(cfg, folder / "config.yaml")

    def encode_prompts(self, prompts: list[str], aspect_ratio: str = "1:1") -> torch.Tensor | None:
        """Prompt template (SPEC section 12) + text encoder: ``(B, L, txt_dim)``, or None without text."""
        if self.text_encoder is None:
            return None
        texts = [prompt_from_config(p, self.config, aspect_ratio) for p in prompts]
        return self.text_encoder(texts).to(self.device)

    def latent_shape(self, aspect_ratio: str = "1:1", frames: int | None = None) -> tuple[int, ...]:
        """``(C, H, W)`` of image latents, or ``(T', C, H, W)`` for a video of ``frames`` pixel frames
        (default: the config's ``vid_size``), for the config's ``img_size`` and an aspect ratio."""
        c, down = self.config, self.vae.downsample
        h, w = aspect_to_size(aspect_ratio, c.img_size, down * c.patch_size)
        if not c.is_video:
            return c.channel_size, h // down, w // down
        return self.latent_frames(frames), c.channel_size, h // down, w // down

    def latent_frames(self, frames: int | None = None) -> int:
        """Latent frames ``T' = (T - 1) // t + 1`` of ``T`` pixel frames (``t`` the VAE's temporal downsampling).

        Raises:
            ValueError: ``frames < 1``.
        """
        return self.vae.geometry.latent_frames(frames or self.config.vid_size[0])

    @property
    def window(self) -> int | None:
        """Latent frames of the training clips, W (the sliding window of longer videos); None for images."""
        return self.latent_frames() if self.config.is_video else None

    def _noise(self, shape: tuple[int, ...], n: int, seeds: list[int] | None,
               generator: torch.Generator | None) -> torch.Tensor:
        if seeds is not None:
            return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
        return torch.randn(n, *shape, generator=generator)

    @torch.no_grad()
    def __call__(self, prompts: list[str], settings: SampleSettings, seeds: list[int] | None = None,
                 generator: torch.Generator | None = None, profile: Profile | None = None,
                 stats: DecodeStats | None = None, input_image: torch.Tensor | None = None) -> torch.Tensor:
        """Sample one image (or video) per prompt.

        Args:
            prompts: B captions.
            settings: guidance, Jacobi, denoising and video-length options.
            seeds: one seed per prompt: each sample's noise comes from its own CPU generator, so a
                sample does not depend on the batch it is in, the device, or the number of ranks.
            generator: RNG for the initial noise when ``seeds`` is None.
            profile: optional per-stage timer.
            stats: optional counter of sequential model evaluations.
            input_image: video models: ``(B, C, H, W)`` pixels in ``[-1, 1]`` at the sampling size, the first
                frame (image-to-video, SPEC section 11): encoded as a one-frame video, noised with ``noise_std``
                (seeded like the noise) and used as the prefix; it comes back as frame 0.

        Returns:
            ``(B, C, H, W)`` image or ``(B, T, C, H, W)`` video pixels, float32 in ``[-1, 1]``.

        Raises:
            ValueError: ``input_image`` with an image model or of the wrong size.
        """
        profile = profile or Profile()
        dev, c = self.device, self.config
        shape = self.latent_shape(settings.aspect_ratio, settings.target_length)
        noise = self._noise(shape, len(prompts), seeds, generator).to(dev)
        with profile.stage("text encoding", dev):
            y = self.encode_prompts(prompts, settings.aspect_ratio)
            guided = settings.cfg > 0 and y is not None
            y_all = torch.cat([y, self.encode_prompts([""] * len(prompts), settings.aspect_ratio)]) if guided else y
            y_extend = None
            if c.is_video and c.drop_image > 0 and y is not None and shape[0] > (self.window or shape[0]):
                y_extend = self.encode_prompts([EXTEND_PREFIX + p for p in prompts], settings.aspect_ratio)
                if guided:
                    y_extend = torch.cat([y_extend, y_all[len(prompts):]])
        context = None
        if input_image is not None:
            context = self._image_context(input_image, shape, seeds, generator, y_all, profile)
        window = self.window
        ctx_frames = None
        if window is not None and shape[0] > window:
            ctx_frames = settings.context_length or min(DEFAULT_CONTEXT_FRAMES, window - 1)
        stats = stats if stats is not None else DecodeStats()
        x = self.model.reverse(noise, y_all, guidance=settings.cfg if guided else 0.0, jacobi=settings.jacobi,
                               jacobi_block_size=settings.jacobi_block_size, jacobi_th=settings.jacobi_th,
                               jacobi_max_iter=settings.jacobi_max_iter,
                               anneal_guidance=settings.anneal_guidance, stats=stats,
                               jacobi_stop=settings.jacobi_stop,
                               rank_sync=any_rank if is_sharded(self.model) else None,
                               context=context, window=window, context_frames=ctx_frames, y_extend=y_extend,
                               timer=lambda name: profile.stage(name, dev, stats))
        if settings.self_denoise and c.noise_std > 0:
            with profile.stage("denoising", dev):
                if self.model.learnable_self_denoiser is not None and x.dim() == 5:
                    x = learned_denoise(self.model, x, y, window=window)
                else:
                    x = self_denoise(self.model, x, y, c.noise_std)
                if context is not None:  # the given first frame stays as it was encoded
                    x[:, : context.frames] = self._prefix_latents
        with profile.stage("VAE decoding", dev):
            pixels = self.vae.decode(x.to(dev))
        return pixels.float().clamp(-1, 1)

    def _image_context(self, image: torch.Tensor, shape: tuple[int, ...], seeds, generator, y_all, profile):
        """Encode the first frame of an image-to-video sample into a :class:`VideoContext`."""
        if not self.config.is_video:
            raise ValueError("input_image is for video models (image-to-video); this config has no vid_size")
        b = image.shape[0]
        with profile.stage("VAE encoding", self.device):
            latent = self.vae.encode(image.to(self.device)[:, None].float(), sample=False).float()  # (B, 1, C, h, w)
        if tuple(latent.shape[2:]) != tuple(shape[1:]):
            raise ValueError(f"input image encodes to latents {tuple(latent.shape[2:])}, the video needs {tuple(shape[1:])}: "
                             "resize it to the sampling size (aspect ratio and img_size)")
        if seeds is not None:
            eps = torch.stack([torch.randn(latent.shape[1:], generator=torch.Generator().manual_seed(s + PREFIX_SEED_OFFSET))
                               for s in seeds])
        else:
            eps = torch.randn(latent.shape, generator=generator)
        prefix = latent + self.config.noise_std * eps.to(latent.device)
        self._prefix_latents = latent
        return self.model.encode_context(prefix, y_all[:b] if y_all is not None else None)
