"""Latent adapters: the map between pixels and the space the flow models.

STARFlow (arXiv 2506.06276) Sec. 3.1 trains the flow in the latent space of a frozen pretrained
autoencoder (SD-VAE for images, SPEC Sec. 13); pixel-space models use no autoencoder at all. Every
adapter offers ``encode(pixels) -> latents`` and ``decode(latents) -> pixels`` with pixels as floats
in ``[-1, 1]``, shaped ``(B, C, H, W)`` (or ``(B, T, C, H, W)`` for videos).

Adding an autoencoder: subclass :class:`LatentAdapter` and add one branch to
:func:`build_latent_adapter`.
"""

from __future__ import annotations

import abc
import os
import pickle
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import torch
from diffusers import AutoencoderKL
from torch import nn

from starflow.adapters.geometry import VAEGeometry, is_wan_vae, no_vae
from starflow.adapters.hub import (check_local_folder, looks_like_local_path, missing_model_error,
                                   resolve_local_files_only, weights_error)

SD_VAE_DEFAULT = "stabilityai/sd-vae-ft-ema"
"""Hub id of the SD-VAE used by the released text-to-image checkpoint."""


Generators = Union[torch.Generator, Sequence[torch.Generator], None]
"""RNG of a posterior draw: one generator for the batch, one per sample (``B`` of them), or None (the global RNG)."""


def posterior_draw(dist, sample: bool, generator: Generators, batch: int) -> torch.Tensor:
    """The mode of a diffusers ``DiagonalGaussianDistribution`` (``sample`` False), or a draw ``mean + std * eps``.

    Args:
        dist: the posterior, ``mean`` of shape ``(B * F, ...)`` (``F`` frames folded into the batch, or 1).
        sample: draw (True) or take the mode (False).
        generator: one generator for the whole batch (as diffusers draws), or ``B`` generators: each sample's ``eps``
            comes from its own, so its latent does not depend on the batch or rank it is encoded in.
        batch: ``B``, the samples the ``mean`` rows belong to.

    Raises:
        ValueError: a sequence of generators that is not one per sample.
    """
    if not sample:
        return dist.mode()
    if generator is None or isinstance(generator, torch.Generator):
        return dist.sample(generator=generator)
    generators = list(generator)
    if len(generators) != batch:
        raise ValueError(f"{len(generators)} generators for a batch of {batch}: give one per sample")
    mean = dist.mean
    rows = (mean.shape[0] // batch, *mean.shape[1:])  # one sample's rows (its frames, for a folded video)
    eps = torch.cat([torch.randn(rows, generator=g, device=g.device) for g in generators])
    return mean + dist.std * eps.to(device=mean.device, dtype=mean.dtype)


class LatentAdapter(nn.Module, abc.ABC):
    """Common interface of the frozen pixel <-> latent maps.

    Attributes:
        name: Where the autoencoder came from (``"none"`` without one).
        downsample: Spatial downsampling factor: latent side = pixel side // downsample.
        latent_channels: Channels C of the latents.
        pixel_channels: Channels of the images it encodes (3, RGB, but for ``vae: none``).
        temporal_downsample: Latent frames ``T' = (T - 1) // temporal_downsample + 1`` (1 but for WAN2.2).
    """

    name: str
    downsample: int
    latent_channels: int
    pixel_channels: int = 3
    temporal_downsample: int = 1

    @property
    def geometry(self) -> VAEGeometry:
        """This adapter's own spatial and temporal factors."""
        return VAEGeometry(self.downsample, self.temporal_downsample)

    @abc.abstractmethod
    def encode(self, pixels: torch.Tensor, *, sample: bool = True,
               generator: Generators = None) -> torch.Tensor:
        """Pixels ``(B, 3, H, W)`` in [-1, 1] -> latents ``(B, C, H/downsample, W/downsample)``.

        Args:
            pixels: Images (or ``(B, T, 3, H, W)`` videos where supported).
            sample: Draw from the posterior (True) or take its mean (False); ignored if deterministic.
            generator: RNG of the posterior sample: one for the batch, or one per sample (:func:`posterior_draw`).
        """

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, C, h, w)`` -> pixels ``(B, 3, h*downsample, w*downsample)`` in about [-1, 1]."""


class IdentityAdapter(LatentAdapter):
    """No autoencoder: the pixels are the latents (config ``vae: none``).

    Args:
        channels: Image channels (config ``channel_size``).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.name = "none"
        self.downsample = 1
        self.latent_channels = self.pixel_channels = channels

    def encode(self, pixels: torch.Tensor, *, sample: bool = True,
               generator: Generators = None) -> torch.Tensor:
        """Return ``pixels`` ``(B, C, H, W)`` in ``[-1, 1]`` unchanged: a pixel model's latents are its pixels
        (``sample`` and ``generator`` have nothing to act on)."""
        return pixels

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Return ``latents`` ``(B, C, H, W)`` unchanged (they are pixels in ``[-1, 1]``)."""
        return latents


def _load_diffusers(model_cls, name_or_path: str, what: str, subfolder: str | None, dtype: torch.dtype,
                    local_files_only: bool | None):
    """``model_cls.from_pretrained`` from a folder, the HF cache or the Hub, with the project's missing-model error."""
    check_local_folder(name_or_path, what, subfolder=subfolder)
    try:
        with warnings.catch_warnings():  # diffusers passes huggingface_hub an argument it no longer reads
            warnings.filterwarnings("ignore", "The `local_dir_use_symlinks` argument is deprecated", UserWarning)
            return model_cls.from_pretrained(name_or_path, subfolder=subfolder, torch_dtype=dtype,
                                             local_files_only=resolve_local_files_only(local_files_only))
    except (OSError, pickle.UnpicklingError) as err:
        refused: BaseException | None = err
        while refused is not None and not isinstance(refused, pickle.UnpicklingError):  # (diffusers raises an OSError
            refused = refused.__cause__ or refused.__context__  # while handling it)
        if refused is not None:
            raise weights_error(name_or_path, what, refused) from None
        raise missing_model_error(name_or_path, what, subfolder=subfolder, cause=err) from err


class SDVAEAdapter(LatentAdapter):
    """A frozen diffusers ``AutoencoderKL`` (SD-VAE), latents scaled by ``config.scaling_factor``.

    ``encode`` returns ``posterior_sample * scaling_factor`` (0.18215 for SD-VAE), ``decode`` undoes
    the scaling (SPEC Sec. 13). Video tensors ``(B, T, C, H, W)`` are encoded frame by frame.

    Args:
        vae: The autoencoder; it is put in eval mode with gradients off.
        name: Where it came from, for messages.
    """

    def __init__(self, vae: AutoencoderKL, name: str = "") -> None:
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.name = name
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = int(vae.config.latent_channels)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = SD_VAE_DEFAULT,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        subfolder: str | None = None,
        local_files_only: bool | None = None,
    ) -> SDVAEAdapter:
        """Load from a local folder, the HF cache, or the Hub (in that order).

        Args:
            name_or_path: Hub id (``stabilityai/sd-vae-ft-ema``) or folder.
            dtype: Weight dtype.
            device: Where the autoencoder runs.
            subfolder: E.g. ``"vae"`` inside a full Stable Diffusion repo.
            local_files_only: True: never contact the Hub; None: True iff ``HF_HUB_OFFLINE`` is set.

        Returns:
            The frozen adapter.

        Raises:
            FileNotFoundError: The model cannot be found; the message says how to download it.
        """
        vae = _load_diffusers(AutoencoderKL, name_or_path, "SD-VAE (diffusers AutoencoderKL)", subfolder, dtype,
                              local_files_only)
        return cls(vae, name=name_or_path).to(device)

    def save_pretrained(self, folder: str | os.PathLike[str]) -> None:
        """Write the autoencoder so that :meth:`from_pretrained` on ``folder`` restores it."""
        self.vae.save_pretrained(folder)

    @property
    def scaling_factor(self) -> float:
        """Latent scale from the VAE config (0.18215 for SD-VAE)."""
        return float(self.vae.config.scaling_factor)

    def train(self, mode: bool = True) -> SDVAEAdapter:
        """Set the training flag of this wrapper; the frozen autoencoder stays in eval mode."""
        super().train(mode)
        self.vae.eval()
        return self

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, *, sample: bool = True,
               generator: Generators = None) -> torch.Tensor:
        """Pixels ``(B, 3, H, W)`` or ``(B, T, 3, H, W)`` in [-1, 1] -> scaled latents.

        Args:
            pixels: Images or videos, H and W multiples of ``downsample``.
            sample: Draw from the posterior (True, as in training) or return its mean (False).
            generator: RNG of the posterior sample: one for the batch, or one per sample (:func:`posterior_draw`).

        Returns:
            Latents ``(B, C, H/downsample, W/downsample)`` (``T`` kept for videos), dtype of ``pixels``.
        """
        x, frames = _fold_frames(pixels)  # (B*T, 3, H, W)
        vae_param = next(self.vae.parameters())
        posterior = self.vae.encode(x.to(device=vae_param.device, dtype=vae_param.dtype)).latent_dist
        z = posterior_draw(posterior, sample, generator, pixels.shape[0])  # (B*T, C, h, w)
        return _unfold_frames(z * self.scaling_factor, frames).to(pixels.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``(B, C, h, w)`` or ``(B, T, C, h, w)`` -> pixels in about [-1, 1].

        Returns:
            Pixels ``(B, 3, h*downsample, w*downsample)`` (``T`` kept for videos), dtype of ``latents``.
        """
        z, frames = _fold_frames(latents)  # (B*T, C, h, w)
        vae_param = next(self.vae.parameters())
        z = z.to(device=vae_param.device, dtype=vae_param.dtype) / self.scaling_factor
        return _unfold_frames(self.vae.decode(z).sample, frames).to(latents.dtype)


WAN_DEFAULT = "Wan-AI/Wan2.2-TI2V-5B-Diffusers"
WAN_STATS_FILE = Path(__file__).with_name("wan22_latent_stats.json")
_SCALE_SUFFIX = re.compile(r":([0-9.]+)$")


class WanVAEAdapter(LatentAdapter):
    """A frozen diffusers ``AutoencoderKLWan`` in the Wan2.2 TI2V-5B layout (STARFlow-V; SPEC section 11).

    48 latent channels, 16x spatial and 4x temporal downsampling (``T' = (T - 1) / 4 + 1``; ``T`` must be
    ``4k + 1``). Latents are normalised per channel, ``(z - latents_mean) / latents_std``, and frames
    ``1 .. T'-1`` are multiplied by ``frame_scale`` (the ``:0.6`` suffix of the config's vae name) after
    encoding and divided by it before decoding. An image is a one-frame video.

    Args:
        vae: the autoencoder; eval mode, gradients off.
        frame_scale: scale of the latent frames after the first.
        name: where it came from, for messages.

    Raises:
        ValueError: the autoencoder's ``latents_mean``/``latents_std`` do not have ``z_dim`` entries (the
            diffusers defaults are Wan2.1's 16 values).
    """

    def __init__(self, vae, frame_scale: float = 1.0, name: str = "") -> None:
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.name, self.frame_scale = name, frame_scale
        cfg = vae.config
        self.downsample = int(cfg.scale_factor_spatial)
        self.temporal_downsample = int(cfg.scale_factor_temporal)
        self.latent_channels = int(cfg.z_dim)
        if len(cfg.latents_mean) != cfg.z_dim or len(cfg.latents_std) != cfg.z_dim:
            raise ValueError(f"{name or 'WAN VAE'}: latents_mean/latents_std have {len(cfg.latents_mean)} entries for "
                             f"z_dim={cfg.z_dim}; use the Wan2.2 statistics ({WAN_STATS_FILE.name})")
        self.register_buffer("mean", torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, 1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, 1, -1, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(cls, name_or_path: str = WAN_DEFAULT + ":0.6", *, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", local_files_only: bool | None = None) -> "WanVAEAdapter":
        """Load from a folder, the HF cache or the Hub; ``name:0.6`` sets ``frame_scale``; the ``vae``
        subfolder of a full Wan2.2 Diffusers repo is used when present (or for Hub ids).

        Raises:
            FileNotFoundError: the autoencoder cannot be found (the message says how to get it).
        """
        from diffusers import AutoencoderKLWan

        match = _SCALE_SUFFIX.search(name_or_path)
        scale = float(match.group(1)) if match else 1.0
        path = name_or_path[: match.start()] if match else name_or_path
        subfolder = "vae" if (os.path.isdir(os.path.join(path, "vae")) or not looks_like_local_path(path)) else None
        vae = _load_diffusers(AutoencoderKLWan, path, "WAN2.2 VAE (diffusers AutoencoderKLWan)", subfolder, dtype,
                              local_files_only)
        return cls(vae, scale, name=name_or_path).to(device)  # the adapter's latent statistics move too

    def save_pretrained(self, folder: str | os.PathLike[str]) -> None:
        """Write the autoencoder so that :meth:`from_pretrained` on ``folder`` restores it."""
        self.vae.save_pretrained(folder)

    def train(self, mode: bool = True) -> "WanVAEAdapter":
        """``nn.Module.train``, except that the frozen VAE always stays in eval mode."""
        super().train(mode)
        self.vae.eval()
        return self

    def _frame_scales(self, frames: int, device) -> torch.Tensor:
        s = torch.full((1, frames, 1, 1, 1), self.frame_scale, device=device)
        s[:, 0] = 1.0
        return s

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, *, sample: bool = True,
               generator: Generators = None) -> torch.Tensor:
        """Pixels ``(B, T, 3, H, W)`` (or an image ``(B, 3, H, W)``) in [-1, 1] -> normalised latents
        ``(B, T', 48, H/16, W/16)`` (an image: ``(B, 48, h, w)``).

        Raises:
            ValueError: ``T`` is not ``4k + 1`` or H, W are not multiples of 16.
        """
        image = pixels.dim() == 4
        x = pixels[:, None] if image else pixels
        t, h, w = x.shape[1], x.shape[-2], x.shape[-1]
        if (t - 1) % self.temporal_downsample or h % self.downsample or w % self.downsample:
            raise ValueError(f"WAN2.2 VAE input {tuple(x.shape)}: frames must be 4k + 1 and H, W multiples of "
                             f"{self.downsample}")
        p = next(self.vae.parameters())
        dist = self.vae.encode(x.permute(0, 2, 1, 3, 4).to(device=p.device, dtype=p.dtype)).latent_dist
        z = posterior_draw(dist, sample, generator, x.shape[0]).permute(0, 2, 1, 3, 4).float()
        z = (z - self.mean) / self.std * self._frame_scales(z.shape[1], z.device)
        z = z.to(pixels.dtype)
        return z[:, 0] if image else z

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``(B, T', 48, h, w)`` (or ``(B, 48, h, w)``) -> pixels ``(B, T, 3, 16h, 16w)``
        in [-1, 1] (an image: ``(B, 3, H, W)``)."""
        image = latents.dim() == 4
        z = (latents[:, None] if image else latents).float()
        z = z / self._frame_scales(z.shape[1], z.device) * self.std + self.mean
        p = next(self.vae.parameters())
        x = self.vae.decode(z.permute(0, 2, 1, 3, 4).to(device=p.device, dtype=p.dtype)).sample
        x = x.permute(0, 2, 1, 3, 4).to(latents.dtype)
        return x[:, 0] if image else x


def build_tiny_wan_vae(*, base_dim: int = 8, seed: int = 0, frame_scale: float = 0.6,
                       device: str | torch.device = "cpu") -> WanVAEAdapter:
    """A tiny randomly initialised ``AutoencoderKLWan`` with the Wan2.2 TI2V-5B layout options (48 channels,
    residual, 2x2 patchify, 16x spatial / 4x temporal, the Wan2.2 latent statistics), for tests."""
    import json

    from diffusers import AutoencoderKLWan

    stats = json.loads(WAN_STATS_FILE.read_text())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(base_dim=base_dim, decoder_base_dim=base_dim, z_dim=48, dim_mult=[1, 2, 4, 4],
                               num_res_blocks=1, temperal_downsample=[False, True, True], is_residual=True,
                               in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16,
                               scale_factor_temporal=4, latents_mean=stats["latents_mean"],
                               latents_std=stats["latents_std"])
    return WanVAEAdapter(vae, frame_scale, name="tiny-wan").to(device)


def _fold_frames(x: torch.Tensor) -> tuple[torch.Tensor, int | None]:
    """``(B, T, C, H, W) -> (B*T, C, H, W)``; 4-D tensors pass through (frames None)."""
    if x.ndim == 4:
        return x, None
    if x.ndim == 5:
        return x.flatten(0, 1), x.shape[1]
    raise ValueError(f"expected (B, C, H, W) or (B, T, C, H, W), got shape {tuple(x.shape)}")


def _unfold_frames(x: torch.Tensor, frames: int | None) -> torch.Tensor:
    """Inverse of :func:`_fold_frames`."""
    return x if frames is None else x.unflatten(0, (-1, frames))


def build_tiny_sd_vae(
    *,
    latent_channels: int = 4,
    block_out_channels: tuple[int, ...] = (8, 16),
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> SDVAEAdapter:
    """A tiny randomly initialised ``AutoencoderKL`` for tests and demos, built without any files.

    Args:
        latent_channels: Latent channels C.
        block_out_channels: Encoder widths; downsample = ``2 ** (len - 1)`` (2 by default).
        seed: Seed of the weight initialisation (the global RNG state is left untouched).
        dtype: Weight dtype.
        device: Where it runs.

    Returns:
        The frozen adapter (scaling factor: the diffusers default, 0.18215).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
            up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
            block_out_channels=block_out_channels,
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=min(8, block_out_channels[0]),
            sample_size=16,
        )
    return SDVAEAdapter(vae.to(device=device, dtype=dtype), name="tiny-sd-vae")


def build_latent_adapter(
    vae: str | None,
    *,
    channels: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    local_files_only: bool | None = None,
) -> LatentAdapter:
    """Choose the adapter named by config ``vae``.

    Args:
        vae: None, ``""`` or ``"none"``: no autoencoder; a Hub id or folder of a diffusers
            ``AutoencoderKL`` (``stabilityai/sd-vae-ft-ema``); a WAN2.2 name (``Wan-AI/Wan2.2-TI2V-5B-Diffusers:0.6``)
            loads :class:`WanVAEAdapter` (the suffix is the frame scale).
        channels: Config ``channel_size``: the channels the flow models (3 without VAE, 4 for SD-VAE).
        dtype: Weight dtype of the autoencoder.
        device: Where it runs.
        local_files_only: See :meth:`SDVAEAdapter.from_pretrained`.

    Returns:
        The adapter.

    Raises:
        ValueError: An autoencoder whose latent channels differ from ``channels``.
        FileNotFoundError: The autoencoder cannot be found.
    """
    if no_vae(vae):
        return IdentityAdapter(channels)
    if is_wan_vae(vae):
        adapter = WanVAEAdapter.from_pretrained(vae, dtype=dtype, device=device, local_files_only=local_files_only)
        if adapter.latent_channels != channels:
            raise ValueError(f"channel_size={channels} but the VAE {vae!r} has {adapter.latent_channels} latent channels")
        return adapter
    adapter = SDVAEAdapter.from_pretrained(vae, dtype=dtype, device=device, local_files_only=local_files_only)
    if adapter.latent_channels != channels:
        raise ValueError(f"channel_size={channels} but the VAE {vae!r} has {adapter.latent_channels} "
                         "latent channels")
    return adapter
