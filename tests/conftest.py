"""Shared fixtures: a tiny text-to-image config, the real digits as image folders, an offline environment.

The tiny config (8x8 greyscale pixels, 2x2 patches, width 32, three flow blocks, the seeded ``tiny-t5``
text encoder, no VAE) trains and samples in well under a second per step on one CPU core.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterator, Mapping

import pytest
import torch
import yaml

from starflow.data import write_digits

# the helpers several test modules share (tests/helpers.py), importable under any --import-mode
sys.path.insert(0, str(Path(__file__).resolve().parent))

TRAIN_IMAGES = 32  # digits in the small training folder (4 batches of 8: a short run crosses an epoch)
TEST_IMAGES = 24  # digits in the small test folder

TINY_CONFIG: dict[str, Any] = dict(
    img_size=8, channel_size=1, patch_size=2, channels=32, head_dim=16, layers_per_block="1 1 2",
    rope=1, sos=1, seq_order="L2R", use_softplus=1, cond_top_only=1, use_final_norm=1, soft_clip=4.0,
    txt_size=24, text="tiny-t5", vae="none", noise_std=0.1, drop_label=0.1,
    lr=1e-3, min_lr=1e-5, warmup_steps=0, steps=6, batch_size=8, grad_clip=1.0,
    num_workers=0, log_freq=1, save_freq=3, sample_freq=0, keep_last=2, seed=0, no_flip=1,
)
"""YAML keys of a tiny pixel-space text-to-image STARFlow; copy before changing."""


@pytest.fixture(scope="session", autouse=True)
def offline_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Never contact the Hugging Face Hub; keep TorchInductor's cache out of the home folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor_cache")))
        yield


@pytest.fixture(scope="session", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread (and do not stall when the cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_config() -> Mapping[str, Any]:
    """:data:`TINY_CONFIG`, read-only: derive variants with ``dict(tiny_config, key=value)``."""
    return MappingProxyType(TINY_CONFIG)


@pytest.fixture
def config_file(tmp_path: Path):
    """``config_file(config, name="config.yaml") -> Path``: write a plain-mapping YAML config in ``tmp_path``."""

    def write(config: Mapping[str, Any], name: str = "config.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
        return path

    return write


@pytest.fixture(scope="session")
def make_pipeline(tiny_config):
    """``make_pipeline(std=0.05, seed=0, **config) -> Pipeline``: a fresh tiny pipeline (``tiny-t5``, no VAE).

    The zero-initialised output layers (``proj_out``, ``final_norm``) get N(0, std^2) noise: a fresh flow is
    the identity, which would hide most bugs.
    """
    from starflow.adapters import build_latent_adapter, build_text_encoder
    from starflow.config import load_config
    from starflow.models import STARFlow
    from starflow.sampling.pipeline import Pipeline

    def build(std: float = 0.05, seed: int = 0, **config: Any) -> Pipeline:
        cfg = load_config(dict(tiny_config, **config))
        text_encoder = build_text_encoder(cfg, device="cpu")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = STARFlow.from_config(cfg, txt_dim=text_encoder.hidden_size, vae_downsample=1)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "proj_out.weight" in name or "final_norm.weight" in name:
                        p.add_(std * torch.randn_like(p))
        return Pipeline(model, text_encoder, build_latent_adapter(None, channels=cfg.channel_size), cfg)

    return build


def _subsample(src: Path, dst: Path, count: int) -> Path:
    """An image folder ``dst`` with the first ``count`` images of ``src`` (PNGs symlinked, not copied)."""
    dst.mkdir(parents=True, exist_ok=True)
    lines = (src / "metadata.jsonl").read_text(encoding="utf-8").splitlines()[:count]
    for line in lines:
        name = json.loads(line)["file_name"]
        (dst / name).symlink_to((src / name).resolve())
    (dst / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dst


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All the real digits: ``root/train`` (1438 images) and ``root/test`` (359), 8x8 greyscale."""
    root = tmp_path_factory.mktemp("digits")
    counts = write_digits(root)
    assert counts == {"train": 1438, "test": 359}
    return root


@pytest.fixture(scope="session")
def digits(digits_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small image folders of real digits: ``{"train": 32 images, "test": 24 images, "root": all}``."""
    small = tmp_path_factory.mktemp("digits_small")
    return {"train": _subsample(digits_root / "train", small / "train", TRAIN_IMAGES),
            "test": _subsample(digits_root / "test", small / "test", TEST_IMAGES),
            "root": digits_root}


class _RunsCode:
    """Unpickling it runs ``touch marker``: what a hostile checkpoint or weights file could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def runs_code(tmp_path: Path) -> tuple[object, Path]:
    """``(payload, marker)``: an object whose unpickling creates the file ``marker`` (which does not exist yet)."""
    return _RunsCode(tmp_path / "ran"), tmp_path / "ran"
