"""Text -> pixels: text encoder, flow sampling with guidance and Jacobi iteration, denoising, VAE decoding.

A *model folder* holds ``config.yaml`` (official format), the flow weights (``model.safetensors`` or a
``.pth`` in the official layout) and, for small models, a ``text_encoder/`` folder. Relative paths in
the config's ``text`` and ``vae`` keys are resolved against the config's folder first.
"""
from __future__ import annotations

import dataclasses
import numbers
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from starflow.adapters import LabelEncoder, LatentAdapter, TextEncoder, build_text_encoder, build_vae
from starflow.assets import EMA_WEIGHT_NAMES, TINY_TEXT_ENCODER, WEIGHT_NAMES, find_weights
from starflow.checkpoint import load_weights, save_weights
from starflow.config import Config, load_config, save_config
from starflow.data.aspect import aspect_to_size, parse_aspect
from starflow.distributed import any_rank, is_sharded, load_sharded, prepare_sharded_inference
from starflow.files import atomic_scratch_path, follow_umask
from starflow.models import STARFlow
from starflow.models.jacobi import DecodeStats
from starflow.models.lora import ADAPTER_WEIGHTS
from starflow.models.starflow import noised_data
from starflow.prompts import EXTEND_PREFIX, LAST_FRAME_PREFIX, V2V_PREFIX, prompt_from_config
from starflow.sampling.denoise import LEARNED_DENOISER_STEP, learned_denoise, self_denoise
from starflow.sampling.settings import Profile, SampleSettings, check_settings
from starflow.sizing import trained_latent_frames

__all__ = ["Pipeline", "SampleSettings", "Profile", "pixel_mask_like", "token_mask", "continuation_frames",
           "check_settings"]

def last_image_beyond_window(target_length: int, vid_size: int, flag: str = "--target_length") -> str:
    """The error of an end frame (``last_image``) asked of a video longer than the trained clip: it conditions one
    window (the training clips ended at it), and the windows after the first would not see it."""
    return (f"{flag} {target_length}: the end frame (last_image) conditions one window of the {vid_size} frames the "
            f"model was trained on (vid_size), and the windows of a longer video would not see it: use {flag} "
            f"{vid_size} or less")


DEFAULT_CONTEXT_FRAMES = 16  # latent frames carried into each new window of a long video (SPEC section 11)
PREFIX_SEED_OFFSET = 1_000_003  # the noise of a known input (prefix, inpainted image): the sample's seed plus this
LAST_SEED_OFFSET = 2_000_003  # the end frame's noise (last_frame_cond)
ROUND_SEED_OFFSET = 3_000_017  # inpainting: resampling round r draws its noise with seed + r * this
PIXEL_SLACK = 1e-3  # float error allowed beyond [-1, 1] in input pixels


def continuation_frames(cfg, temporal_downsample: int, target_length: int | None = None) -> int:
    """Pixel frames a continuation adds after an input clip: ``target_length``, else the trained clip's frames after
    its first (``vid_size - 1`` rounded down to a multiple of the VAE's temporal factor ``t``; at least ``t``), or the
    whole ``vid_size`` when ``t`` is 1."""
    if target_length:
        return target_length
    t, frames = temporal_downsample, cfg.vid_size[0]
    return max(t, (frames - 1) // t * t) if t > 1 else frames


def _require_dims(pixels: torch.Tensor, what: str, dims: int) -> None:
    """Refuse pixels without the batch layout of their argument: 4 dims ``(B, C, H, W)``, one image per prompt, or
    5 dims ``(B, T, C, H, W)``, one clip per prompt.

    Raises:
        ValueError: another number of dims (the message says how to add the batch axis or which argument takes clips).
    """
    if pixels.dim() == dims:
        return
    layout = "(B, C, H, W) pixels in [-1, 1], one image per prompt" if dims == 4 else \
        "(B, T, C, H, W) pixels in [-1, 1], one clip per prompt (one clip: clip[None])"
    hint = " (a clip to continue is input_video)" if dims == 4 and pixels.dim() == 5 else ""
    raise ValueError(f"{what} {tuple(pixels.shape)}: needs {layout}{hint}")


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
        """The device of the flow's weights (where sampling runs)."""
        return next(self.model.parameters()).device

    @classmethod
    @torch.inference_mode(False)  # loaded inside a caller's inference_mode too, the weights stay ordinary tensors
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
            ValueError: ``ema`` with a weights file; a config file given as the weights.
            TypeError: ``dtype`` is not a ``torch.dtype``.
            CheckpointError: the weights file is corrupt or truncated, or its names/shapes differ from the
                config's model (every difference listed); nothing is half-loaded.
        """
        path = Path(folder_or_weights)
        if path.suffix.lower() in (".yaml", ".yml", ".json") and path.is_file():
            raise ValueError(f"{path} is a config, not weights: pass the model folder (config.yaml beside the "
                             "weights), or the weights file with config=")
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype {dtype!r}: pass a torch.dtype, e.g. torch.bfloat16")
        if ema and path.is_file():
            raise ValueError(f"ema: {path} is a weights file; the moving-average weights are read from a model folder "
                             "(its ema.safetensors): pass the folder, or the EMA weights file itself without ema")
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

    def save_pretrained(self, folder: str | Path, weights: Mapping[str, torch.Tensor] | None = None,
                        extra: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> None:
        """Write a model folder: ``config.yaml``, ``model.safetensors`` (official layout) and, for the tiny
        preset text encoder, ``text_encoder/`` (the config then points at it; a class vocabulary is copied
        beside the weights). ``weights`` replaces the
        model's own state dict (e.g. the gathered weights of a sharded model); ``extra`` maps more weight files of the
        folder to their tensors (``ema.safetensors``, ``lora.safetensors``).

        Everything is written into a scratch folder inside ``folder`` first, so a write that fails (a full disk) leaves
        an earlier export there as it was. Then the earlier export's config goes, its weights (``model.*``,
        ``ema.safetensors``, ``lora.safetensors``) are replaced, and the new config comes last: a folder never mixes
        the weights and config of two runs or steps, and one whose replacement was killed has no config, so it does
        not load. Files get the umask's permissions (a group can read the folder).

        Raises:
            OSError: a file cannot be written (the message names it); ``folder`` is then left as it was.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_scratch_path(folder / "config.yaml") as config_path:  # moved in last, once the rest is in place
            staging = config_path.parent
            cfg = self.config
            local_text = self.text_encoder is not None and Path(self.text_encoder.name).is_dir()
            if isinstance(self.text_encoder, LabelEncoder):  # the class vocabulary travels with the weights
                cfg = load_config(cfg, {"text": self.text_encoder.save_pretrained(staging).name})
            elif self.text_encoder is not None and (cfg.text == TINY_TEXT_ENCODER or local_text):
                self.text_encoder.save_pretrained(staging / "text_encoder")
                follow_umask(staging / "text_encoder")  # (its weights are written for the owner alone)
                cfg = load_config(cfg, {"text": "text_encoder"})
            save_weights(self.model if weights is None else weights, staging / "model.safetensors")
            for name, tensors in (extra or {}).items():
                save_weights(tensors, staging / name)
            save_config(cfg, config_path)
            (folder / "config.yaml").unlink(missing_ok=True)  # from here until the new config is in, it does not load
            for name in (*WEIGHT_NAMES, *EMA_WEIGHT_NAMES, ADAPTER_WEIGHTS):
                (folder / name).unlink(missing_ok=True)
            for made in staging.iterdir():
                if made != config_path:
                    if made.is_dir() and (folder / made.name).is_dir():
                        shutil.rmtree(folder / made.name)
                    os.replace(made, folder / made.name)

    def default_settings(self, batch_size: int = 16, **changes) -> SampleSettings:
        """The :class:`SampleSettings` ``starflow sample`` uses for this model without flags: the config's guidance
        ``cfg`` and ``temperature``, and ``"auto"`` Jacobi chunks chosen for ``batch_size`` (``--sample_batch_size``),
        with ``changes`` applied (field names). With them and ``seeds=[seed + i, ...]`` this pipeline gives the CLI's
        samples exactly.

        Raises:
            TypeError, ValueError: a change to an unknown field or to a value :class:`SampleSettings` refuses.
        """
        base = dict(cfg=self.config.cfg, temperature=self.config.temperature, jacobi_auto_batch=batch_size)
        return SampleSettings(**{**base, **changes})

    def encode_prompts(self, prompts: list[str], aspect_ratio: str = "1:1", fps: int | None = None,
                       noise_std: float | None = None) -> torch.Tensor | None:
        """Prompt template (SPEC section 12) + text encoder: ``(B, L, txt_dim)``, or None without text.

        ``fps`` and ``noise_std`` replace the config's in the template (``fps_cond``, ``cond_noise_level``).
        A caption longer than ``txt_size`` tokens is truncated with a warning; a caption that fits but whose
        template tags run past ``txt_size`` is truncated silently, exactly as the model's training prompts were.

        Raises:
            TypeError: ``prompts`` is not a list of strings.
            ValueError: ``prompts`` is empty.
        """
        self._check_prompts(prompts)
        if self.text_encoder is None:
            return None
        texts = [prompt_from_config(p, self.config, aspect_ratio, fps=fps, noise_std=noise_std) for p in prompts]
        return self.text_encoder.encode_templated(prompts, texts).to(self.device)

    def _prompts(self, prompts: list[str], settings: SampleSettings, fps: int | None = None) -> torch.Tensor | None:
        """:meth:`encode_prompts` with the settings' aspect ratio, fps (unless ``fps`` is given) and noise level."""
        return self.encode_prompts(prompts, settings.aspect_ratio, settings.fps if fps is None else fps,
                                   settings.noise_std)

    def latent_shape(self, aspect_ratio: str = "1:1", frames: int | None = None) -> tuple[int, ...]:
        """``(C, H, W)`` of image latents, or ``(T', C, H, W)`` for a video of ``frames`` pixel frames
        (default: the config's ``vid_size``), for the config's ``img_size`` and an aspect ratio.

        Raises:
            ValueError: a malformed ratio, or a ratio other than 1:1 for a model trained without ``mix_aspect``.
        """
        c, down = self.config, self.vae.downsample
        if not c.mix_aspect and parse_aspect(aspect_ratio) != 1.0:
            raise ValueError(f"aspect_ratio {aspect_ratio}: this model was trained on square {c.img_size}x{c.img_size} "
                             "samples only (mix_aspect 0): sample 1:1, or use a model trained with mix_aspect 1")
        h, w = aspect_to_size(aspect_ratio, c.img_size, down * c.patch_size)
        if not c.is_video:
            return c.channel_size, h // down, w // down
        return self.latent_frames(frames), c.channel_size, h // down, w // down

    def latent_frames(self, frames: int | None = None) -> int:
        """Latent frames ``T' = (T - 1) // t + 1`` of ``T`` pixel frames (``t`` the VAE's temporal downsampling);
        ``frames`` None: the config's clip length (``vid_size``).

        Raises:
            ValueError: ``frames < 1``, or an image model.
        """
        if not self.config.is_video:
            raise ValueError("latent_frames: this is an image model (no vid_size); frames are for video models")
        return self.vae.geometry.latent_frames(self.config.vid_size[0] if frames is None else frames)

    @property
    def window(self) -> int | None:
        """Latent frames of the training clips, W (the sliding window of longer videos); None for images."""
        return self.latent_frames() if self.config.is_video else None

    @property
    def trained_latent_frames(self) -> int | None:
        """Latent frames of one training sample: the clip, plus the source clip (``video_to_video``) or the end
        frame (``last_frame_cond``) trained before it; None for images."""
        return trained_latent_frames(self.config, self.latent_frames()) if self.config.is_video else None

    def _noise(self, shape: tuple[int, ...], n: int, seeds: list[int] | None,
               generator: torch.Generator | None, offset: int = 0, uniform: bool = False) -> torch.Tensor:
        """Standard normal ``(n, *shape)`` (``uniform``: ``U[0, 1)``): row ``i`` from its own CPU generator seeded
        ``seeds[i] + offset``.

        Raises:
            ValueError: ``seeds`` is not one seed per sample.
        """
        draw = torch.rand if uniform else torch.randn
        if seeds is not None:
            if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence) or not all(
                    isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in seeds):
                raise TypeError(f"seeds must be a list of integers, one per prompt, got {seeds!r:.80}")
            if len(seeds) != n:
                raise ValueError(f"{len(seeds)} seed(s) for {n} sample(s): give one seed per prompt")
            seeds = [int(s) for s in seeds]  # numpy integers too
            if not all(-2**63 <= s + offset < 2**63 for s in seeds):
                raise ValueError("seeds must fit in 64 bits (|seed| < 2^63)")
            return torch.stack([draw(shape, generator=torch.Generator().manual_seed(s + offset)) for s in seeds])
        device = generator.device if generator is not None else "cpu"  # a CUDA generator draws on its GPU
        return draw(n, *shape, generator=generator, device=device)

    def _latent_noise(self, shape: tuple[int, ...], n: int, seeds: list[int] | None,
                      generator: torch.Generator | None, settings: SampleSettings, offset: int = 0) -> torch.Tensor:
        """The noise the flow inverts: :meth:`_noise` times ``settings.temperature`` (Glow's sampling temperature;
        the noise of known inputs, :meth:`_noised`, is never scaled)."""
        noise = self._noise(shape, n, seeds, generator, offset)
        return noise if settings.temperature == 1.0 else noise * settings.temperature

    @staticmethod
    def _check_prompts(*prompt_lists: list[str]) -> None:
        """Refuse a bare string or an empty list where a list of captions is expected.

        Raises:
            TypeError: a ``str`` (it would be read as one caption per character) or items that are not strings.
            ValueError: no prompts.
        """
        for prompts in prompt_lists:
            if not isinstance(prompts, Sequence) or isinstance(prompts, str) or not all(isinstance(p, str)
                                                                                       for p in prompts):
                raise TypeError(f"prompts must be a list of strings, one per sample, got {prompts!r:.80}: wrap a "
                                "single caption in a list (and make a generator a list)")
            if not prompts:
                raise ValueError("no prompts: give at least one caption (one sample per caption)")

    def _check_settings(self, settings: SampleSettings, negatives: list[str] | None = None) -> None:
        """:func:`check_settings` against this model, after checking the types.

        Raises:
            TypeError: ``settings`` is not a :class:`SampleSettings`, or ``negatives`` not a list of strings.
            ValueError: see :func:`check_settings`.
        """
        if not isinstance(settings, SampleSettings):
            raise TypeError(f"settings must be a SampleSettings, got {type(settings).__name__}")
        if negatives is not None and (isinstance(negatives, str) or not all(isinstance(n, str) for n in negatives)):
            raise TypeError(f"negative_prompts must be a list of strings, one per prompt, got {negatives!r:.80}")
        check_settings(settings, self.config, negatives)

    def _encode_text(self, prompts: list[str], settings: SampleSettings, tag: str = "",
                     negatives: list[str] | None = None, fps: int | None = None):
        """``(y, y_all, guided)``: conditional rows of ``tag + prompt``, the guidance rows ``[cond; uncond]`` (the
        unconditional rows encode the negative prompts, ``""`` by default); ``fps`` replaces the settings' (0: the
        image prompt of a one-frame sample)."""
        y = self._prompts([tag + p for p in prompts], settings, fps)
        guided = settings.cfg > 0 and y is not None
        if negatives is not None and len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts: give one per prompt")
        uncond = negatives if negatives is not None else [""] * len(prompts)
        y_all = torch.cat([y, self._prompts(uncond, settings, fps)]) if guided else y
        return y, y_all, guided

    def _reverse(self, noise: torch.Tensor, y_all, guided: bool, settings: SampleSettings, profile: Profile,
                 stats: DecodeStats, **kwargs) -> torch.Tensor:
        """:meth:`STARFlow.reverse` with the settings' guidance and Jacobi options, timed per block."""
        dev = self.device
        return self.model.reverse(noise, y_all, guidance=settings.cfg if guided else 0.0, jacobi=settings.jacobi,
                                  jacobi_block_size=settings.jacobi_block_size, jacobi_th=settings.jacobi_th,
                                  jacobi_max_iter=settings.jacobi_max_iter, anneal_guidance=settings.anneal_guidance,
                                  stats=stats, jacobi_stop=settings.jacobi_stop,
                                  rank_sync=any_rank if is_sharded(self.model) else None, guide_top=settings.guide_top,
                                  attn_temp=settings.attn_temp, timer=lambda name: profile.stage(name, dev, stats),
                                  jacobi_auto_batch=settings.jacobi_auto_batch, **kwargs)

    def denoising(self, settings: SampleSettings, video: bool) -> tuple[str, float, float]:
        """The denoising step sampling takes (STARFlow Sec. 3.3, STARFlow-V Sec. 3.3): ``(kind, step, noise_std)``,
        ``kind`` ``"learned"`` (a video model's learnable denoiser, ``settings.learnable_denoiser``), ``"tweedie"``
        (the score of the flow itself) or ``"off"`` (``self_denoise`` off, or no Gaussian noise: ``noise_std`` 0 or
        ``noise_type: uniform``); ``step`` the update's factor (``self_denoising_lr``, else 1 for Tweedie's formula,
        ``LEARNED_DENOISER_STEP`` for the learned one); ``noise_std`` the noise level it removes."""
        c = self.config
        std = c.noise_std if settings.noise_std is None else settings.noise_std
        if c.noise_type == "uniform":  # dequantisation noise, below one 8-bit level: quantising removes it
            std = 0.0
        if not (settings.self_denoise and std > 0):
            return "off", 0.0, std
        lr = settings.self_denoising_lr
        if self.model.learnable_self_denoiser is not None and video and settings.learnable_denoiser:
            return "learned", LEARNED_DENOISER_STEP if lr is None else lr, std
        return "tweedie", 1.0 if lr is None else lr, std

    def _denoise(self, x: torch.Tensor, y, settings: SampleSettings, profile: Profile,
                 clean: tuple[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Remove the training noise from sampled latents (SPEC section 10); ``clean = (P, latents)`` puts back the
        first ``P`` frames as they were encoded (a video prefix). A ``noise_type: uniform`` model's samples carry
        dequantisation noise below one 8-bit level, not Gaussian noise: they get no Tweedie step (quantising the
        pixels to 8 bits removes it)."""
        dev = self.device
        kind, step, std = self.denoising(settings, video=x.dim() == 5)
        if kind != "off":
            learned = kind == "learned"
            n = settings.denoising_batch_size or x.shape[0]
            parts = []
            with profile.stage("denoising", dev):
                for s in range(0, x.shape[0], n):  # --denoising_batch_size: the Tweedie step holds a backward pass
                    xs, ys = x[s : s + n], None if y is None else y[s : s + n]
                    if learned:
                        parts.append(learned_denoise(self.model, xs, ys, window=self.trained_latent_frames, step=step))
                    else:
                        parts.append(self_denoise(self.model, xs, ys, std, step=step))
            x = torch.cat(parts)
        if clean is not None:
            x = x.clone()
            x[:, : clean[0]] = clean[1].to(x.dtype)
        return x

    def _decode(self, latents: torch.Tensor, profile: Profile) -> torch.Tensor:
        """VAE decoding to pixels clamped to ``[-1, 1]``.

        Raises:
            ValueError: a sample is not finite (NaN or inf: guidance or temperature too large for the model, or
                weights that are not finite, named), which would otherwise be written as a black image.
        """
        with profile.stage("VAE decoding", self.device):
            pixels = self.vae.decode(latents.to(self.device)).float()
        bad = ~torch.isfinite(pixels.flatten(1)).all(1)
        if bad.any():
            broken = next((name for name, t in self.model.state_dict().items()
                           if t.is_floating_point() and not torch.isfinite(t).all()), None)
            cause = (f"the model's weights are not finite ({broken} holds NaN or inf): the checkpoint is damaged or "
                     "was saved from a diverged run" if broken else
                     "the guidance (cfg) or temperature is too large for this model; lower it")
            raise ValueError(f"{int(bad.sum())} of {len(bad)} samples came out non-finite (NaN or inf), which would be "
                             f"written as black images: {cause}")
        return pixels.clamp(-1, 1)

    def _encode_pixels(self, pixels: torch.Tensor, what: str, shape: tuple[int, ...], profile: Profile,
                       batch: int) -> torch.Tensor:
        """Clean latents of pixels ``(B, C, H, W)`` or ``(B, T, C, H, W)`` in ``[-1, 1]`` (a video keeps ``T``), checked
        against the prompts (``batch`` = B), the VAE's image channels, the pixel range and the sampling size
        ``shape[-3:]``.

        Raises:
            TypeError: an integer or bool tensor.
            ValueError: another batch size, channel count or size, or values outside ``[-1, 1]`` or not finite.
        """
        if pixels.shape[0] != batch:
            raise ValueError(f"{what} holds {pixels.shape[0]} item(s) for {batch} prompt(s): give one per prompt")
        channels = self.vae.pixel_channels
        if pixels.shape[-3] != channels:
            kind = "grayscale" if channels == 1 else "RGB" if channels == 3 else f"{channels}-channel"
            raise ValueError(f"{what} {tuple(pixels.shape)} has {pixels.shape[-3]} channel(s) (dimension -3); this "
                             f"model samples {kind} images: convert it to {channels} channel(s)")
        if not pixels.is_floating_point():
            raise TypeError(f"{what} is a {pixels.dtype} tensor; pixels must be floats in [-1, 1]: map 8-bit values "
                            "v to v / 127.5 - 1 (a 0/1 or bool image to x * 2.0 - 1)")
        if not torch.isfinite(pixels).all():
            raise ValueError(f"{what} holds {int((~torch.isfinite(pixels)).sum())} NaN or infinite value(s); pixels "
                             "must be finite, in [-1, 1]")
        lo, hi = pixels.aminmax()
        if lo < -1 - PIXEL_SLACK or hi > 1 + PIXEL_SLACK:
            raise ValueError(f"{what} values span [{lo.item():g}, {hi.item():g}]; pixels must be in [-1, 1]: map "
                             "8-bit values v to v / 127.5 - 1")
        with profile.stage("VAE encoding", self.device):
            latent = self.vae.encode(pixels.to(self.device).float(), sample=False).float()
        if tuple(latent.shape[-3:]) != tuple(shape[-3:]):
            down = self.vae.downsample
            raise ValueError(f"{what} {tuple(pixels.shape)} encodes to latents {tuple(latent.shape[-3:])}, the sample "
                             f"needs {tuple(shape[-3:])}: resize it to {shape[-2] * down}x{shape[-1] * down} pixels "
                             "(the aspect ratio and img_size)")
        return latent

    def _noised(self, latent: torch.Tensor, seeds, generator, offset: int, settings: SampleSettings) -> torch.Tensor:
        """A known input as training noised it (:func:`~starflow.models.starflow.noised_data`): ``latent + noise_std *
        eps`` (the settings' ``target_noise_std`` if given), or a ``noise_type: uniform`` model's 8-bit
        dequantisation; ``eps`` seeded per sample (``seed + offset``) like the noise."""
        uniform = self.config.noise_type == "uniform"
        eps = self._noise(tuple(latent.shape[1:]), latent.shape[0], seeds, generator, offset, uniform=uniform)
        std = self.config.noise_std if settings.noise_std is None else settings.noise_std
        return noised_data(latent, eps.to(latent.device), dataclasses.replace(self.config, noise_std=std))

    @torch.no_grad()
    def __call__(self, prompts: list[str], settings: SampleSettings, seeds: list[int] | None = None,
                 generator: torch.Generator | None = None, profile: Profile | None = None,
                 stats: DecodeStats | None = None, input_image: torch.Tensor | None = None,
                 input_video: torch.Tensor | None = None, last_image: torch.Tensor | None = None,
                 negative_prompts: list[str] | None = None, sequence: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Sample one image (or video) per prompt.

        Args:
            prompts: B captions.
            settings: guidance, Jacobi, denoising and video-length options.
            seeds: one seed per prompt: each sample's noise comes from its own CPU generator, so a sample does
                not depend on the batch it is in, the device, or the number of ranks, as long as the decoding does not
                either: a fixed ``jacobi_block_size``, or ``"auto"`` with ``jacobi_auto_batch`` set (the CLI sets it to
                ``--sample_batch_size``; without it "auto" picks the chunk from each call's batch), up to float rounding
                (matrix products round by their row count, ~1e-5). ``starflow sample``
                gives sample ``i`` the seed ``seed + i``; :meth:`default_settings` gives its settings.
            generator: RNG for the initial noise when ``seeds`` is None (a CPU or a CUDA generator).
            profile: optional per-stage timer.
            stats: optional counter of sequential model evaluations.
            input_image: video models: ``(B, C, H, W)`` pixels in ``[-1, 1]`` at the sampling size, the first
                frame (image-to-video, SPEC section 11): encoded as a one-frame video, noised with ``noise_std``
                (seeded like the noise) and used as the prefix; it comes back as frame 0.
            input_video: video models: ``(B, T, C, H, W)`` pixels of a clip to continue (SPEC sections 11, 17; ``T``
                frames the VAE accepts, ``(T - 1) % temporal_downsample == 0``). Its last ``context_length`` latent
                frames (default ``min(16, W - 1)``) are the prefix (with the ``"(extend) "`` caption when the clip
                is cut), then ``target_length`` new pixel frames (a multiple of the VAE's temporal factor; default
                the config's clip length after its first frame, rounded down to that multiple: 80 for
                ``vid_size 81`` and factor 4, see :func:`continuation_frames`) follow, window by window; the result is the whole clip followed by them.
                For a ``video_to_video`` model use :meth:`video_to_video`.
            last_image: ``last_frame_cond`` video models: ``(B, C, H, W)`` the end frame, encoded as a one-frame
                prefix with the ``"(last) "`` caption (before the first frame when ``input_image`` is also given);
                it is not part of the result.
            negative_prompts: B texts the unconditional guidance rows encode instead of ``""`` (a negative prompt:
                guidance steers away from it); None or ``""`` = the plain classifier-free guidance of the papers.
            sequence: a list that receives the pixels of every stage (``starflow sample --return_sequence``): the
                noise, the latents after each flow block is inverted (deep block first; before denoising), each
                decoded by the VAE, then the result; each ``(B, [T,] C, H, W)`` in ``[-1, 1]``.

        Returns:
            ``(B, C, H, W)`` image or ``(B, T, C, H, W)`` video pixels, float32 in ``[-1, 1]``. A video model's
            one-frame sample (``target_length`` 1) is prompted as an image (``"An image:"`` with ``fps_cond``), as
            one-frame training samples are.

        Raises:
            ValueError: an input of the wrong kind (video inputs with an image model, ``last_image`` with a model
                not trained with ``last_frame_cond``, ``input_video`` with ``input_image`` or ``last_image``), size,
                frame count, channel count or pixel range, or not one per prompt; seeds not one per prompt;
                ``sequence`` with ``input_video``; ``input_image`` with a ``target_length`` of one latent frame;
                ``last_image`` with a ``target_length`` beyond the trained clip (one window); a
                ``target_length`` the VAE cannot decode (not ``tk + 1``, ``t`` its temporal factor); settings that
                would not act on this model (:meth:`_check_settings`).
            TypeError: prompts, seeds, negative prompts or settings of the wrong type.
        """
        self._check_prompts(prompts)
        self._check_settings(settings, negative_prompts)
        profile = profile or Profile()
        c = self.config
        if (input_image is not None or input_video is not None or last_image is not None) and not c.is_video:
            raise ValueError("input_image, input_video and last_image are for video models (image-to-video, "
                             "continuation, end frame); this config has no vid_size")
        if input_video is not None:
            if sequence is not None:
                raise ValueError("the block-by-block sequence (return_sequence) is for sampling from noise and "
                                 "image-to-video, not for continuing an input_video")
            if input_image is not None or last_image is not None:
                raise ValueError("input_video (continuation) cannot be combined with input_image or last_image")
            return self._continue(prompts, input_video, settings, seeds, generator, profile, stats, negative_prompts)
        if last_image is not None and not c.last_frame_cond:
            raise ValueError("last_image needs a model trained with last_frame_cond (its config says 0): the end "
                             "frame conditions only such models")
        for name, image in (("input_image", input_image), ("last_image", last_image)):
            if image is not None:
                _require_dims(image, name, 4)
        if c.is_video and settings.target_length:
            self.vae.geometry.check_decodable(settings.target_length)
        shape = self.latent_shape(settings.aspect_ratio, settings.target_length)
        if last_image is not None and shape[0] > self.window:
            raise ValueError(last_image_beyond_window(settings.target_length, c.vid_size[0], "target_length"))
        if input_image is not None and shape[0] < 2:
            raise ValueError(f"target_length {settings.target_length}: input_image is the first of these frames, so "
                             f"none would be sampled; use {1 + self.vae.temporal_downsample} or more")
        stats = stats if stats is not None else DecodeStats()
        with profile.stage("text encoding", self.device):
            tag = LAST_FRAME_PREFIX if last_image is not None else ""
            # one frame from a video model is an image: trained as one ("An image:", fps 0; SPEC sections 12, 16)
            still = c.is_video and shape[0] == 1 and last_image is None
            y, y_all, guided = self._encode_text(prompts, settings, tag, negative_prompts, fps=0 if still else None)
            y_extend = None
            if c.is_video and c.drop_image > 0 and y is not None and shape[0] > (self.window or shape[0]):
                y_extend = self._prompts([EXTEND_PREFIX + p for p in prompts], settings)
                if guided:
                    y_extend = torch.cat([y_extend, y_all[len(prompts):]])
        prefix = []  # (clean latents, noised latents, keep in the result)
        if last_image is not None:
            end = self._encode_pixels(last_image[:, None], "last_image", shape, profile, len(prompts))
            prefix.append((end, self._noised(end, seeds, generator, LAST_SEED_OFFSET, settings), False))
        if input_image is not None:
            first = self._encode_pixels(input_image[:, None], "input_image", shape, profile, len(prompts))
            prefix.append((first, self._noised(first, seeds, generator, PREFIX_SEED_OFFSET, settings), True))
        drop = sum(1 for *_, keep in prefix if not keep)
        noise = self._latent_noise((shape[0] + drop, *shape[1:]) if c.is_video else shape, len(prompts), seeds,
                                   generator, settings)
        inter = [] if sequence is not None else None
        x = self._sample_after(noise.to(self.device), prefix, y_all, guided, settings, profile, stats,
                               y_extend=y_extend, intermediates=inter)
        clean = None
        if prefix:
            clean = (len(prefix), torch.cat([lat for lat, *_ in prefix], 1))
        pixels = self._decode(self._denoise(x, y, settings, profile, clean)[:, drop:], profile)
        if sequence is not None:
            for stage in [noise.to(self.device), *inter]:
                sequence.append(self._decode(stage[:, drop:] if drop else stage, profile))
            sequence.append(pixels)
        return pixels

    def _sample_after(self, noise: torch.Tensor, prefix, y_all, guided, settings, profile, stats, y_extend=None,
                      intermediates: list | None = None):
        """Sample ``noise`` (video: the prefix frames included) after the encoded prefix latents."""
        window = self.trained_latent_frames
        context = ctx_frames = None
        if prefix:
            noised = torch.cat([nz for _, nz, _ in prefix], 1)
            context = self.model.encode_context(noised, y_all)
        if window is not None and noise.shape[1] > window:
            ctx_frames = settings.context_length or min(DEFAULT_CONTEXT_FRAMES, window - 1)
        return self._reverse(noise, y_all, guided, settings, profile, stats, context=context, window=window,
                             context_frames=ctx_frames, y_extend=y_extend, intermediates=intermediates)

    def _continue(self, prompts, video, settings, seeds, generator, profile, stats, negatives=None) -> torch.Tensor:
        """Continue clips ``(B, T, C, H, W)``: see ``input_video`` in :meth:`__call__`."""
        c, geo = self.config, self.vae.geometry
        t = geo.temporal_downsample
        _require_dims(video, "input_video", 5)
        if (video.shape[1] - 1) % t:
            raise ValueError(f"input_video {tuple(video.shape)}: needs (B, T, C, H, W) with T - 1 a multiple of {t} "
                             f"(the VAE's temporal factor): trim it to {1 + (video.shape[1] - 1) // t * t} frames")
        new_frames = continuation_frames(c, t, settings.target_length)
        if new_frames < 1 or new_frames % t:
            raise ValueError(f"continuation adds target_length = {new_frames} pixel frames; it must be a positive "
                             f"multiple of {t} (each latent frame after the first covers {t} frames)")
        shape = self.latent_shape(settings.aspect_ratio)
        clip = self._encode_pixels(video, "input_video", shape, profile, len(prompts))  # (B, Tc, C, h, w)
        window = self.window
        ctx = min(clip.shape[1], settings.context_length or min(DEFAULT_CONTEXT_FRAMES, window - 1))
        if not 1 <= ctx < window:
            raise ValueError(f"context_length {ctx}: continuation needs 1 <= context_length < {window} (the window)")
        cut = clip.shape[1] > ctx  # the context does not start at the video's first frame: "(extend) "
        with profile.stage("text encoding", self.device):
            y_plain, y_all, guided = self._encode_text(prompts, settings, negatives=negatives)
            y_ext, y_ext_all, _ = self._encode_text(prompts, settings, EXTEND_PREFIX, negatives) if c.drop_image > 0 else (
                y_plain, y_all, guided)
        stats = stats if stats is not None else DecodeStats()
        prefix = [(clip[:, -ctx:], self._noised(clip[:, -ctx:], seeds, generator, PREFIX_SEED_OFFSET, settings), True)]
        n_new = new_frames // t
        noise = self._latent_noise((ctx + n_new, *shape[1:]), len(prompts), seeds, generator, settings).to(self.device)
        x = self._sample_after(noise, prefix, y_ext_all if cut else y_all, guided, settings, profile, stats,
                               y_extend=y_ext_all)
        x = self._denoise(x, y_ext if cut else y_plain, settings, profile, (ctx, clip[:, -ctx:]))
        return self._decode(torch.cat([clip[:, :-ctx], x], 1), profile)  # the whole clip, then the new frames

    @torch.no_grad()
    def video_to_video(self, prompts: list[str], source: torch.Tensor, settings: SampleSettings,
                       seeds: list[int] | None = None, generator: torch.Generator | None = None,
                       profile: Profile | None = None, stats: DecodeStats | None = None,
                       negative_prompts: list[str] | None = None) -> torch.Tensor:
        """Video-to-video with a ``video_to_video``-trained model (STARFlow-V; SPEC sections 16, 17).

        The source clip is encoded, noised with ``noise_std`` and run through the flow as a prefix (as
        image-to-video), the prompt is ``"(v2v) " + caption``, and as many target latent frames as the source has
        are sampled after it; the prefix is dropped.

        Args:
            prompts: B captions of the target clips.
            source: ``(B, T, C, H, W)`` source pixels in ``[-1, 1]`` at the sampling size, ``T`` the config's clip
                length (``vid_size`` frames).
            settings, seeds, generator, profile, stats, negative_prompts: as :meth:`__call__` (the negative prompts
                are the guidance's unconditional rows, untagged like the default ``""``).

        Returns:
            ``(B, T, C, H, W)`` target pixels in ``[-1, 1]``.

        Raises:
            ValueError: the model was not trained with ``video_to_video``, the clip has another size, length,
                channel count or pixel range, the clips, seeds or negative prompts are not one per prompt, or
                ``settings`` sets ``target_length`` or ``context_length`` (the source's length is the target's).
        """
        self._check_prompts(prompts)
        self._check_settings(settings, negative_prompts)
        profile, c = profile or Profile(), self.config
        if not c.video_to_video:
            raise ValueError("video_to_video needs a model trained with video_to_video (its config says 0); to "
                             "continue a clip with this model pass it as input_video")
        redraw = [name for name in ("target_length", "context_length") if getattr(settings, name) is not None]
        if redraw:
            raise ValueError(f"{redraw[0]}: video_to_video redraws the source clip's {c.vid_size[0]} frames (vid_size), "
                             "in one window: leave it None")
        _require_dims(source, "source clip", 5)
        if source.shape[1] != c.vid_size[0]:
            raise ValueError(f"source clip {tuple(source.shape)}: the model was trained on (B, {c.vid_size[0]}, C, H, W) "
                             f"clips (vid_size {c.vid_size[0]} frames): cut or resample it to that length")
        shape = self.latent_shape(settings.aspect_ratio)
        src = self._encode_pixels(source, "source clip", shape, profile, len(prompts))
        with profile.stage("text encoding", self.device):
            y, y_all, guided = self._encode_text(prompts, settings, V2V_PREFIX, negative_prompts)
        stats = stats if stats is not None else DecodeStats()
        frames = src.shape[1]
        noise = self._latent_noise((2 * frames, *shape[1:]), len(prompts), seeds, generator, settings).to(self.device)
        prefix = [(src, self._noised(src, seeds, generator, PREFIX_SEED_OFFSET, settings), False)]
        x = self._sample_after(noise, prefix, y_all, guided, settings, profile, stats)
        return self._decode(self._denoise(x, y, settings, profile)[:, frames:], profile)

    # ------------------------------------------------------------------ images: inpainting and editing
    def _image_inputs(self, image: torch.Tensor, mask: torch.Tensor | None, settings: SampleSettings,
                      what: str, profile: Profile, batch: int):
        """Clean latents of ``image``, the sample's latent shape, and the pixel and token masks (or None)."""
        if self.config.is_video:
            raise ValueError(f"{what} works on image models; this config is a video model (vid_size)")
        shape = self.latent_shape(settings.aspect_ratio)
        if image.dim() != 4:
            raise ValueError(f"{what}: the input image must be (B, C, H, W) pixels in [-1, 1], got {tuple(image.shape)}")
        latent = self._encode_pixels(image, "input image", shape, profile, batch)
        if mask is None:
            return latent, shape, None, None
        pixel_mask = pixel_mask_like(mask, image).to(self.device)  # the decoded pixels are on the model's device
        return latent, shape, pixel_mask, token_mask(pixel_mask, self.vae.downsample * self.config.patch_size)

    @torch.no_grad()
    def inpaint(self, prompts: list[str], image: torch.Tensor, mask: torch.Tensor, settings: SampleSettings,
                seeds: list[int] | None = None, generator: torch.Generator | None = None, rounds: int = 1,
                profile: Profile | None = None, stats: DecodeStats | None = None,
                latents: dict | None = None) -> torch.Tensor:
        """Training-free inpainting with teacher-forced known tokens (STARFlow; SPEC section 17).

        The image is encoded and noised (``x~``, seeded per sample), the pixel mask is max-pooled to the token
        grid, and :meth:`STARFlow.reverse` samples from ``(1 - m) f(x~) + m T eps`` (``T`` the temperature) with
        every block's known activations forced at the known tokens (guidance and Jacobi as ``settings``). Each
        further round re-encodes the result (its known activations now agree with the generated tokens) and
        samples the masked tokens again from fresh noise. Then the usual denoising and decoding, and the known pixels are pasted
        back, so they are exactly the input's.

        Args:
            prompts: B captions of the completed images.
            image: ``(B, C, H, W)`` pixels in ``[-1, 1]`` at the sampling size (aspect ratio, ``img_size``).
            mask: pixel mask, 1 = generate: ``(B, 1, H, W)``, ``(B, H, W)`` or ``(H, W)`` (values > 0.5 count).
            settings, seeds, generator, profile, stats: as :meth:`__call__`.
            rounds: sampling rounds K >= 1.
            latents: optional dict that receives ``"input"`` (``x~``) and ``"sampled"`` (the last round's
                latents before denoising), ``(B, C, h, w)``.

        Returns:
            ``(B, C, H, W)`` pixels in ``[-1, 1]``, equal to ``image`` wherever the mask is 0.

        Raises:
            ValueError: a video model, a mask or image of another size, an image batch, channel count or pixel
                range that does not fit the prompts and the model, seeds that are not one per prompt, ``rounds < 1``.
        """
        self._check_prompts(prompts)
        self._check_settings(settings)
        if rounds < 1:
            raise ValueError(f"inpainting needs rounds >= 1, got {rounds}")
        profile, stats = profile or Profile(), stats if stats is not None else DecodeStats()
        latent, shape, pixel_mask, tokens = self._image_inputs(image, mask, settings, "inpainting", profile,
                                                                 len(prompts))
        x_known = self._noised(latent, seeds, generator, PREFIX_SEED_OFFSET, settings)
        with profile.stage("text encoding", self.device):
            y, y_all, guided = self._encode_text(prompts, settings)
        x = x_known
        for r in range(rounds):
            noise = self._latent_noise(shape, len(prompts), seeds, generator, settings, r * ROUND_SEED_OFFSET)
            noise = noise.to(self.device)
            x = self._reverse(noise, y_all, guided, settings, profile, stats, known=x, mask=tokens)
        if latents is not None:
            latents.update(input=x_known, sampled=x)
        pixels = self._decode(self._denoise(x, y, settings, profile), profile)
        return torch.where(pixel_mask, pixels, image.to(pixels))

    @torch.no_grad()
    def edit(self, source_prompts: list[str], prompts: list[str], image: torch.Tensor, settings: SampleSettings,
             mask: torch.Tensor | None = None, seeds: list[int] | None = None, generator: torch.Generator | None = None,
             profile: Profile | None = None, stats: DecodeStats | None = None,
             latents: dict | None = None) -> torch.Tensor:
        """Training-free editing by inversion (STARFlow; SPEC section 17).

        ``z = f(x~, y_source)``, then ``x' = f^-1(z, [y_target; y_uncond], w)``: the image's own noise, decoded
        under the new caption. With ``mask`` only the masked region changes (inpainting with ``z`` as the masked
        noise; known = outside the mask, pasted back in pixels). With ``prompts == source_prompts`` and guidance 0
        the sampled latents reproduce ``x~``: up to float error with sequential decoding (``jacobi=False``), to the
        Jacobi tolerance otherwise (``jacobi_th``; ~1e-2 at the default 1e-4 on a random-weight model).

        Args:
            source_prompts: B captions describing the input image.
            prompts: B target captions.
            image: ``(B, C, H, W)`` pixels in ``[-1, 1]`` at the sampling size.
            settings: guidance (``cfg``), Jacobi and denoising options.
            mask: optional pixel mask, 1 = may change (as :meth:`inpaint`).
            seeds, generator, profile, stats: as :meth:`__call__` (the seed draws the noise of ``x~``).
            latents: optional dict that receives ``"input"`` (``x~``), ``"inverted"`` (``z``) and ``"sampled"``.

        Returns:
            ``(B, C, H, W)`` edited pixels in ``[-1, 1]``.

        Raises:
            ValueError: a video model, caption counts that differ from the batch, inputs of another size, channel
                count or pixel range, seeds that are not one per prompt, or a sampling temperature other than 1 (the noise is the image's own, not drawn).
        """
        self._check_prompts(source_prompts, prompts)
        self._check_settings(settings)
        if settings.temperature != 1.0:
            raise ValueError(f"editing decodes the image's own inverted noise, which temperature "
                             f"{settings.temperature:g} would not scale: pass --temperature 1 (or temperature=1.0)")
        if not len(source_prompts) == len(prompts) == image.shape[0]:
            raise ValueError(f"editing needs one source and one target caption per image: got {len(source_prompts)}, "
                             f"{len(prompts)} and {image.shape[0]} images")
        profile, stats = profile or Profile(), stats if stats is not None else DecodeStats()
        latent, shape, pixel_mask, tokens = self._image_inputs(image, mask, settings, "editing", profile, len(prompts))
        x_known = self._noised(latent, seeds, generator, PREFIX_SEED_OFFSET, settings)
        with profile.stage("text encoding", self.device):
            y_source = self._prompts(source_prompts, settings)
            y, y_all, guided = self._encode_text(prompts, settings)
        with profile.stage("inversion", self.device):
            z = self.model(x_known, y_source).z
        masked = {} if tokens is None else {"known": x_known, "mask": tokens}
        x = self._reverse(z, y_all, guided, settings, profile, stats, **masked)
        if latents is not None:
            latents.update(input=x_known, inverted=z, sampled=x)
        pixels = self._decode(self._denoise(x, y, settings, profile), profile)
        return pixels if pixel_mask is None else torch.where(pixel_mask, pixels, image.to(pixels))


def pixel_mask_like(mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """A pixel mask as bool ``(B, 1, H, W)`` for ``image (B, C, H, W)``, from ``(B, 1, H, W)``, ``(B, H, W)`` or
    ``(H, W)`` (values > 0.5 are True = generate).

    Raises:
        ValueError: the mask's size differs from the image's.
    """
    b, _, h, w = image.shape
    m = mask.to(image.device)
    if m.dim() == 2:
        m = m[None]
    if m.dim() == 3:
        m = m[:, None]
    if m.dim() != 4 or m.shape[1] != 1 or tuple(m.shape[-2:]) != (h, w) or m.shape[0] not in (1, b):
        raise ValueError(f"mask {tuple(mask.shape)} does not fit the image {tuple(image.shape)}: give (H, W), (B, H, W) "
                         f"or (B, 1, H, W) with H, W = {h}, {w}")
    return (m.float() > 0.5).expand(b, 1, h, w)


def token_mask(pixel_mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Max-pool a pixel mask ``(B, 1, H, W)`` (True = generate) to the token grid ``(B, H / factor, W / factor)``:
    a token is generated when any of its pixels is (``factor`` = VAE downsampling x patch size; SPEC section 17)."""
    pooled = torch.nn.functional.max_pool2d(pixel_mask.float(), factor)
    return pooled[:, 0] > 0.5
