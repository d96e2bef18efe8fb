"""Frozen pretrained components around the flow: the T5 text encoder and the latent adapters (VAEs)."""

from starflow.adapters.build import build_text_encoder, build_vae
from starflow.adapters.geometry import VAEGeometry, vae_geometry
from starflow.adapters.hub import missing_model_error
from starflow.adapters.labels import LabelEncoder, is_vocab
from starflow.adapters.text import T5_DEFAULT, TINY_T5, TextEncoder, build_tiny_text_encoder
from starflow.adapters.vae import (
    SD_VAE_DEFAULT,
    IdentityAdapter,
    LatentAdapter,
    SDVAEAdapter,
    build_latent_adapter,
    build_tiny_sd_vae,
    build_tiny_wan_vae,
    WanVAEAdapter,
)

__all__ = [
    "SD_VAE_DEFAULT",
    "T5_DEFAULT",
    "TINY_T5",
    "IdentityAdapter",
    "LabelEncoder",
    "LatentAdapter",
    "SDVAEAdapter",
    "TextEncoder",
    "VAEGeometry",
    "build_latent_adapter",
    "build_text_encoder",
    "build_tiny_sd_vae",
    "build_tiny_wan_vae",
    "build_vae",
    "WanVAEAdapter",
    "build_tiny_text_encoder",
    "is_vocab",
    "missing_model_error",
    "vae_geometry",
]
