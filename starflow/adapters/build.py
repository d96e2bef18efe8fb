"""The frozen components a config names, built once for training, latent caching, sampling and export."""
from __future__ import annotations

from pathlib import Path

import torch

from starflow.adapters.geometry import VAEGeometry
from starflow.adapters.labels import LabelEncoder, is_vocab
from starflow.adapters.text import TextEncoder, build_tiny_text_encoder
from starflow.adapters.vae import LatentAdapter, build_latent_adapter
from starflow.assets import TINY_TEXT_ENCODER, resolve_asset
from starflow.config import Config

__all__ = ["build_text_encoder", "build_vae"]


def build_text_encoder(cfg: Config, *dirs: Path | str | None, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> TextEncoder | LabelEncoder | None:
    """The config's text encoder (``None`` for ``txt_size: 0``); ``tiny-t5`` builds the seeded tiny preset, a
    ``*.vocab`` file the class-label encoder (:mod:`starflow.adapters.labels`).

    Args:
        cfg: the config (``text``, ``txt_size``, ``seed``).
        dirs: folders searched first for the config's ``text`` entry (the config's, the weights'), then
            :func:`starflow.assets.asset_search_dirs`, then the Hugging Face cache and the Hub.
        device, dtype: where and in which precision the encoder runs.

    Raises:
        ValueError: ``txt_size > 0`` without a ``text`` entry.
        FileNotFoundError: the encoder is nowhere to be found (the message says how to get it).
    """
    if cfg.txt_size == 0:
        return None
    if cfg.text == TINY_TEXT_ENCODER:
        return build_tiny_text_encoder(cfg.txt_size, seed=cfg.seed).to(device)
    if cfg.text is None:
        raise ValueError("config key 'text' is empty but txt_size > 0: name a T5 (e.g. google/flan-t5-xl)")
    if is_vocab(cfg.text):
        return LabelEncoder.from_file(resolve_asset(cfg.text, *dirs))
    return TextEncoder.from_pretrained(resolve_asset(cfg.text, *dirs), max_length=cfg.txt_size, dtype=dtype,
                                       device=device)


def build_vae(cfg: Config, *dirs: Path | str | None, device: str | torch.device = "cpu") -> LatentAdapter:
    """The config's latent adapter (identity for ``vae: none``), ``vae`` looked up like the text encoder.

    Raises:
        ValueError: the VAE's latent channels differ from ``channel_size``, or ``img_size`` is no multiple of its
            factor x ``patch_size`` (:meth:`~starflow.adapters.geometry.VAEGeometry.check_img_size`, with the loaded
            VAE's own factor: a local VAE's name does not tell it).
        FileNotFoundError: the VAE is nowhere to be found.
    """
    vae = build_latent_adapter(resolve_asset(cfg.vae, *dirs), channels=cfg.channel_size, device=device)
    VAEGeometry(vae.downsample).check_img_size(cfg.img_size, cfg.patch_size)
    return vae
