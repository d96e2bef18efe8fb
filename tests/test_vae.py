"""Latent adapters (SPEC Sec. 13) on a tiny offline AutoencoderKL."""

from __future__ import annotations

import time
import warnings

import pytest
import torch
from diffusers import AutoencoderKL

from starflow.adapters.vae import (
    IdentityAdapter,
    SDVAEAdapter,
    build_latent_adapter,
    build_tiny_sd_vae,
)


@pytest.fixture(scope="module")
def adapter() -> SDVAEAdapter:
    return build_tiny_sd_vae()


def pixels(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("block_out_channels", [(8, 16), (8, 16, 16)])
def test_shapes_and_downsample_from_config(block_out_channels: tuple[int, ...]) -> None:
    vae = build_tiny_sd_vae(block_out_channels=block_out_channels)
    assert vae.downsample == 2 ** (len(block_out_channels) - 1) and vae.latent_channels == 4
    x = pixels(2, 3, 16, 16)
    z = vae.encode(x)
    side = 16 // vae.downsample
    assert z.shape == (2, 4, side, side) and z.dtype == torch.float32
    assert vae.decode(z).shape == (2, 3, 16, 16)


def test_scaling_factor_read_from_config() -> None:
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), norm_num_groups=8, latent_channels=4,
                        scaling_factor=0.5)
    adapter = SDVAEAdapter(vae)
    assert adapter.scaling_factor == 0.5 and adapter.downsample == 1
    x = pixels(1, 3, 8, 8)
    with torch.no_grad():
        expected = vae.encode(x).latent_dist.mean * 0.5
    torch.testing.assert_close(adapter.encode(x, sample=False), expected)


def test_encode_mean_and_decode_match_diffusers(adapter: SDVAEAdapter) -> None:
    x = pixels(2, 3, 16, 16)
    scale = adapter.vae.config.scaling_factor
    with torch.no_grad():
        expected_z = adapter.vae.encode(x).latent_dist.mean * scale
        z = adapter.encode(x, sample=False)
        torch.testing.assert_close(z, expected_z)
        torch.testing.assert_close(adapter.decode(z), adapter.vae.decode(z / scale).sample)


def test_sample_uses_generator(adapter: SDVAEAdapter) -> None:
    x = pixels(1, 3, 16, 16)
    a = adapter.encode(x, generator=torch.Generator().manual_seed(1))
    b = adapter.encode(x, generator=torch.Generator().manual_seed(1))
    c = adapter.encode(x, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, adapter.encode(x, sample=False))


@pytest.mark.parametrize("kind", ["sd_video", "wan"])
def test_per_sample_generators_make_a_latent_independent_of_its_batch(adapter: SDVAEAdapter, kind: str) -> None:
    """With one generator per sample, sample i's posterior draw is the same in any batch (training seeds it by
    (seed, step, index), so it is the same on any number of ranks)."""
    from starflow.adapters import build_tiny_wan_vae

    if kind == "sd_video":
        vae, x = adapter, pixels(3, 2, 3, 16, 16)  # (B, T, C, H, W): frames folded into the batch
    else:
        vae, x = build_tiny_wan_vae(), pixels(3, 5, 3, 32, 32)

    def gens(indices: range) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(100 + i) for i in indices]

    whole = vae.encode(x, generator=gens(range(3)))
    parts = torch.cat([vae.encode(x[:1], generator=gens(range(1))), vae.encode(x[1:], generator=gens(range(1, 3)))])
    torch.testing.assert_close(whole, parts, rtol=0, atol=1e-5)
    assert not torch.allclose(whole, vae.encode(x, sample=False))  # a draw, not the mean
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        vae.encode(x, generator=gens(range(2)))


def test_video_frames_encoded_independently(adapter: SDVAEAdapter) -> None:
    video = pixels(2, 3, 3, 16, 16)  # (B, T, C, H, W)
    z = adapter.encode(video, sample=False)
    assert z.shape == (2, 3, 4, 8, 8)
    torch.testing.assert_close(z[:, 1], adapter.encode(video[:, 1], sample=False))
    assert adapter.decode(z).shape == video.shape
    with pytest.raises(ValueError, match="shape"):
        adapter.encode(torch.zeros(3, 16, 16))


def test_frozen_and_no_grad(adapter: SDVAEAdapter) -> None:
    assert not any(p.requires_grad for p in adapter.parameters())
    adapter.train()
    assert not adapter.vae.training
    adapter.eval()
    x = pixels(1, 3, 16, 16).requires_grad_()
    assert not adapter.encode(x).requires_grad


def test_low_precision_vae_keeps_input_dtype() -> None:
    vae = build_tiny_sd_vae(dtype=torch.bfloat16)
    z = vae.encode(pixels(1, 3, 16, 16), sample=False)
    assert z.dtype == torch.float32 and vae.decode(z).dtype == torch.float32


def test_identity_adapter_round_trip() -> None:
    identity = IdentityAdapter(3)
    x = pixels(2, 3, 8, 8)
    assert identity.downsample == 1 and identity.latent_channels == 3 and identity.name == "none"
    assert torch.equal(identity.decode(identity.encode(x)), x)


@pytest.mark.parametrize("name", [None, "", "none", "None"])
def test_build_without_vae(name: str | None) -> None:
    adapter = build_latent_adapter(name, channels=3)
    assert isinstance(adapter, IdentityAdapter) and adapter.latent_channels == 3


def test_build_wan_offline_says_how_to_get_it() -> None:
    with pytest.raises(FileNotFoundError, match="WAN2.2 VAE.*hf download Wan-AI/Wan2.2-TI2V-5B-Diffusers"), \
            warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        build_latent_adapter("Wan-AI/Wan2.2-TI2V-5B-Diffusers:0.6", channels=48)
    assert not [w for w in seen if "local_dir_use_symlinks" in str(w.message)]  # a library's noise, not the user's


def test_build_from_local_folder_round_trip(adapter: SDVAEAdapter, tmp_path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    adapter.save_pretrained(tmp_path)
    loaded = build_latent_adapter(str(tmp_path), channels=4)
    assert isinstance(loaded, SDVAEAdapter) and loaded.downsample == adapter.downsample
    x = pixels(1, 3, 16, 16)
    assert torch.equal(loaded.encode(x, sample=False), adapter.encode(x, sample=False))
    elsewhere = build_latent_adapter(str(tmp_path), channels=4, device="meta")
    assert {t.device.type for t in [*elsewhere.parameters(), *elsewhere.buffers()]} == {"meta"}
    with pytest.raises(ValueError, match="channel_size=3"):
        build_latent_adapter(str(tmp_path), channels=3)


@pytest.mark.parametrize("kind", ["missing_folder", "hub_id"])
def test_missing_vae_fails_fast_with_help(kind: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = str(tmp_path / "no-vae") if kind == "missing_folder" else "starflow-tests/no-such-vae"
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as info:
        build_latent_adapter(name, channels=4)
    assert time.perf_counter() - start < 5.0
    assert name in str(info.value) and "SD-VAE" in str(info.value)
    if kind == "hub_id":
        assert "hf download starflow-tests/no-such-vae" in str(info.value)
