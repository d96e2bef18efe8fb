"""The STARFlow-V training recipe (SPEC section 16): loss weight of ``cond_noise_level`` and the denoiser target,
the denoiser's cosine, uniform dequantisation, flips, multi-rate clips, aspect buckets for clips, the secondary
image mix, the ``video_to_video`` / ``last_frame_cond`` modes, and the same losses on 1 and 2 processes.
"""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from starflow.cli import main
from starflow.config import load_config
from starflow.data import sample_seed
from starflow.data.moving_digits import render_clip
from starflow.data.video import VideoFolder, write_video
from starflow.distributed import init_distributed
from starflow.train import launch
from starflow.train.recipe import Recipe
from helpers import TINY_VIDEO, clip_folder, losses, run_env, train_cmd

pytestmark = pytest.mark.usefixtures("one_thread")


def trainer_for(config: dict, logdir: Path):
    return launch.build_trainer(load_config(config, {"logdir": str(logdir)}), init_distributed("cpu"))


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    return clip_folder(tmp_path_factory.mktemp("recipe_clips"), n=8, frames=8)


def test_cond_noise_level_weights_the_loss_and_the_denoiser_target(tiny_config, digits, tmp_path) -> None:
    config = dict(tiny_config, data=str(digits["train"]), cond_noise_level=1, noise_std=0.15, txt_size=48,
                  learnable_self_denoiser=1, conditional_denoiser=1, latent_norm_regularization=0.5)
    trainer = trainer_for(config, tmp_path)
    batch = next(trainer._batches())
    out = trainer.micro_step(batch, 1.0, sync=True)
    data = trainer.recipe.prepare(batch, 0, 0)
    x, drop = trainer.recipe.noised(data.latents, 0, 0)
    prompts = trainer.recipe.prompts(data.captions, batch["aspect_ratio"], data.fps, drop)
    assert all(p.startswith("Noise Level 150:") for p in prompts)
    y = trainer.text_encoder(prompts)
    x.requires_grad_(True)
    flow = trainer.model(x, y)
    regulariser = 0.5 * sum(o.square().mean() for o in flow.outputs[1:-1])
    assert regulariser.item() > 1e-3
    plain = trainer.model.loss_from_output(flow)["loss"] - regulariser
    weighted = plain * 0.15 / 0.3 + regulariser  # the sample's likelihood is weighted, not the regulariser
    assert out["loss"].item() == pytest.approx(weighted.item(), rel=1e-6)
    (grad,) = torch.autograd.grad(weighted, x)
    target = 0.15 * x.numel() * grad  # x - 0.3 D(x) = x + noise_std^2 grad log p for any noise_std
    with torch.no_grad():
        expected = torch.nn.functional.mse_loss(trainer.model.denoiser(x.detach(), y), target)
    assert out["denoiser_loss"].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("too_large", ["flow", "denoiser"])
def test_grad_skip_skips_the_flow_and_the_denoiser_together(tiny_config, digits, tmp_path, too_large) -> None:
    """``grad_skip``: from step GRAD_SKIP_AFTER on, a step whose flow or denoiser gradient norm exceeds
    ``grad_clip`` changes neither (before it, both are clipped and applied). The denoiser has its own AdamW with
    AdamW's default betas (SPEC section 10 sets its lr and weight decay only)."""
    from starflow.train.trainer import GRAD_SKIP_AFTER

    config = dict(tiny_config, data=str(digits["train"]), learnable_self_denoiser=1, grad_clip=1e-6, grad_skip=1)
    trainer = trainer_for(config, tmp_path)
    assert trainer.denoiser_optimizer.param_groups[0]["betas"] == (0.9, 0.999)
    assert trainer.optimizer.param_groups[0]["betas"] == (0.9, 0.95)
    flow = [p for n, p in trainer.model.named_parameters() if "denoiser" not in n]
    batches = trainer._batches()
    if too_large == "denoiser":  # only the denoiser's norm is above the threshold
        trainer._denoiser_grad_norm = lambda: 1e9
        trainer.cfg = trainer.cfg.__class__(**{**vars(trainer.cfg), "grad_clip": 1e6})
    for step, applied in ((GRAD_SKIP_AFTER - 1, True), (GRAD_SKIP_AFTER, False)):
        trainer.step = step
        before = [p.detach().clone() for p in (*flow, *trainer.denoiser.parameters())]
        metrics = trainer.train_step([next(batches)])
        after = list((*flow, *trainer.denoiser.parameters()))
        moved_flow = any(not torch.equal(a, b) for a, b in zip(before[:len(flow)], after[:len(flow)]))
        moved_denoiser = any(not torch.equal(a, b) for a, b in zip(before[len(flow):], after[len(flow):]))
        assert metrics["skipped"] == float(not applied) and (moved_flow, moved_denoiser) == (applied, applied), step


def test_the_flow_and_the_denoiser_are_clipped_and_judged_apart(tiny_config, digits, tmp_path, monkeypatch) -> None:
    """The flow's gradient norm (logged, clipped, tested by grad_skip) is its own, without the denoiser's; a non-finite
    denoiser gradient stops the denoiser's update only."""
    import starflow.train.trainer as trainer_module

    config = dict(tiny_config, data=str(digits["train"]), learnable_self_denoiser=1, grad_clip=1.0)
    trainer = trainer_for(config, tmp_path)
    denoiser = list(trainer.denoiser.parameters())
    flow = [p for p in trainer.model.parameters() if all(p is not d for d in denoiser)]
    calls, clip = [], trainer_module.clip_grad_norm

    def spy(params, max_norm):
        calls.append({id(p) for p in params})
        return clip(params, max_norm)

    monkeypatch.setattr(trainer_module, "clip_grad_norm", spy)
    batches = trainer._batches()
    trainer.train_step([next(batches)])
    assert calls == [{id(p) for p in denoiser}, {id(p) for p in flow}]
    denoiser[0].register_hook(lambda g: g * float("nan"))
    before = [p.detach().clone() for p in (*flow, *denoiser)]
    metrics = trainer.train_step([next(batches)])
    assert metrics["skipped"] == 0.0 and math.isfinite(metrics["grad_norm"])
    assert not all(torch.equal(a, b) for a, b in zip(before[:len(flow)], flow))  # the flow stepped
    assert all(torch.equal(a, b) for a, b in zip(before[len(flow):], denoiser))  # the denoiser did not


def test_denoiser_follows_its_own_cosine(tiny_config, digits, tmp_path) -> None:
    config = dict(tiny_config, data=str(digits["train"]), learnable_self_denoiser=1, denoiser_lr=1e-3, steps=8,
                  lr=1e-3, warmup_steps=0)
    trainer = trainer_for(config, tmp_path)
    trainer.fit(max_steps=3)
    expected = 1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + math.cos(math.pi * 3 / 8))
    assert trainer.denoiser_optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-9)


def test_uniform_dequantisation_and_flips(tiny_config, digits, tmp_path) -> None:
    config = dict(tiny_config, data=str(digits["train"]), noise_type="uniform", no_flip=0)
    trainer = trainer_for(config, tmp_path)
    recipe, batch = trainer.recipe, next(trainer._batches())
    data = recipe.prepare(batch, 5, 16)
    flips = [bool(torch.rand((), generator=torch.Generator().manual_seed(sample_seed(0, 5, 16 + i, "flip"))) < 0.5)
             for i in range(8)]
    assert 0 < sum(flips) < 8  # some flipped, some not: the check below can fail both ways
    for i, f in enumerate(flips):
        assert torch.equal(data.latents[i], batch["pixels"][i].flip(-1) if f else batch["pixels"][i])
    x, _ = recipe.noised(data.latents, 5, 16)
    bins = torch.floor((x + 1) / 2 * 256)  # each value stays inside its 8-bit pixel's bin
    assert torch.equal(bins, torch.round((data.latents + 1) * 127.5))
    assert not torch.equal(x, recipe.noised(data.latents, 6, 16)[0])
    with pytest.raises(ValueError, match="needs 'vae: none'"):
        load_config(dict(config, vae="stabilityai/sd-vae-ft-ema"))


def test_multi_rate_clips_and_fps_prompts(clips) -> None:
    ds = VideoFolder(clips, frames=3, fps=(4, 8), size=(8, 8), channels=1, seed=1)
    rates = [ds[i]["fps"] for i in range(len(ds))]
    assert set(rates) == {4, 8}
    assert rates == [ds[i]["fps"] for i in range(len(ds))]  # seeded by (seed, epoch, index)
    ds.set_epoch(1)
    assert rates != [ds[i]["fps"] for i in range(len(ds))]
    cfg = load_config(dict(TINY_VIDEO, vid_size="3:4:8", fps_cond=1))
    assert cfg.fps == 4 and cfg.fps_choices == (4, 8) and cfg.to_dict()["vid_size"] == "3:4:8"
    recipe = Recipe(cfg, None, torch.device("cpu"))
    assert recipe.prompts(["a"], ["1:1"], [8.0], [False]) == ["A video with 8 fps:\na\n"]
    assert recipe.prompts(["a"], ["1:1"], [0.0], [False]) == ["An image:\na\n"]


def test_clips_go_to_their_aspect_bucket(tmp_path) -> None:
    digit = (np.arange(64).reshape(8, 8) * 4).astype(np.uint8)
    wide = np.concatenate([render_clip(digit, 4, 8, (0, 0), "left")] * 2, axis=2)  # 4 frames of 8 x 16
    write_video(tmp_path / "wide.mp4", wide, 8, lossless=True)
    write_video(tmp_path / "square.mp4", render_clip(digit, 4, 8, (0, 0), "up"), 8, lossless=True)
    lines = [{"file_name": "wide.mp4", "text": "w", "fps": 8}, {"file_name": "square.mp4", "text": "s", "fps": 8}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    ds = VideoFolder(tmp_path, frames=3, fps=8, size=(8, 8), channels=1, mix_aspect=True, img_size=8, multiple=2)
    assert ds.buckets == ["16:9", "1:1"]
    assert ds[0]["pixels"].shape[-2:] == (6, 10) and ds[0]["aspect_ratio"] == "16:9"  # SPEC section 13 sizes
    assert ds[1]["pixels"].shape[-2:] == (8, 8)


def test_video_to_video_and_last_frame_modes(clips) -> None:
    pixels = VideoFolder(clips, frames=8, fps=8, size=(8, 8), channels=1, random_start=False)[0]["pixels"][None]
    batch = {"pixels": pixels, "text": ["a digit"], "aspect_ratio": ["1:1"]}
    from starflow.adapters import build_latent_adapter

    identity = build_latent_adapter(None, channels=1)
    v2v = Recipe(load_config(dict(TINY_VIDEO, vid_size="4:8", video_to_video=1, drop_image=0, no_flip=1)), identity,
                 torch.device("cpu")).prepare(batch, 0, 0)
    assert torch.equal(v2v.latents, torch.cat([pixels[:, 4:], pixels[:, :4]], 1))  # [source; target]
    assert v2v.captions == ["(v2v) a digit"]
    last_cfg = load_config(dict(TINY_VIDEO, vid_size="8:8", last_frame_cond=1, drop_image=0, no_flip=1))
    last = Recipe(last_cfg, identity, torch.device("cpu")).prepare(batch, 0, 0)
    assert torch.equal(last.latents, torch.cat([pixels[:, 7:8], pixels], 1))  # a pixel model: the last frame first
    assert last.captions == ["(last) a digit"]
    wan_like = build_latent_adapter(None, channels=1)  # a VAE of temporal factor 4 (WAN2.2): pixel frame F - 4
    wan_like.temporal_downsample = 4
    last = Recipe(last_cfg, wan_like, torch.device("cpu")).prepare(batch, 0, 0)
    assert torch.equal(last.latents, torch.cat([pixels[:, 4:5], pixels], 1))
    with pytest.raises(ValueError, match="two data modes"):
        load_config(dict(TINY_VIDEO, video_to_video=1, last_frame_cond=1, drop_image=0))


def test_the_vae_posterior_draw_is_seeded_per_sample() -> None:
    """Sample i of step s draws the same latent whatever the global RNG (each rank seeds it with seed + rank) and
    whichever samples share its batch."""
    from starflow.adapters import build_tiny_sd_vae

    cfg = load_config(dict(img_size=16, channel_size=4, patch_size=2, channels=32, head_dim=16,
                           layers_per_block="1 1", vae="tiny-sd", noise_std=0.3, no_flip=1))
    recipe = Recipe(cfg, build_tiny_sd_vae(), torch.device("cpu"))
    pixels = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batch = {"text": ["a"] * 4, "pixels": pixels, "aspect_ratio": ["1:1"] * 4}
    torch.manual_seed(0)
    whole = recipe.prepare(batch, step=5, first=0).latents
    torch.manual_seed(1)  # rank 1 of two: the last two samples
    half = recipe.prepare({k: v[2:] for k, v in batch.items()}, step=5, first=2).latents
    torch.testing.assert_close(whole[2:], half, rtol=0, atol=1e-6)
    assert not torch.allclose(recipe.prepare(batch, step=6, first=0).latents, whole)  # a new draw each step


def test_drop_image_drops_the_first_latent_frame(clips) -> None:
    """As a latent cache does (SPEC section 16): the whole clip is encoded, which the WAN2.2 VAE needs (4k + 1
    frames), and its first latent frame is dropped."""
    from starflow.adapters import build_latent_adapter, build_tiny_wan_vae

    pixels = VideoFolder(clips, frames=5, fps=8, size=(8, 8), channels=1, random_start=False)[0]["pixels"][None]
    batch = {"pixels": pixels, "text": ["a digit"], "aspect_ratio": ["1:1"]}
    cfg = load_config(dict(TINY_VIDEO, vid_size="5:8", drop_image=1.0, no_flip=1))
    out = Recipe(cfg, build_latent_adapter(None, channels=1), torch.device("cpu")).prepare(batch, 0, 0)
    assert torch.equal(out.latents, pixels[:, 1:]) and out.captions == ["(extend) a digit"]
    wan = build_tiny_wan_vae()
    rgb = {**batch, "pixels": pixels.expand(-1, -1, 3, -1, -1).repeat(1, 1, 1, 2, 2)}  # 16 x 16 RGB for the VAE
    out = Recipe(cfg, wan, torch.device("cpu")).prepare(rgb, 0, 0)
    assert out.latents.shape == wan.encode(rgb["pixels"], sample=False)[:, 1:].shape  # 5 frames -> 2 latent, 1 kept


@pytest.mark.parametrize("keys, message", [
    (dict(loss_scaling=1), "'loss_scaling: 1' (fp16 dynamic loss scaling) is not supported"),
    (dict(secondary_ratio=0.5), "pass them with --secondary_data FOLDER"),
    (dict(drop_image=0.25), "'drop_image' (0.25) drops the first frame of video clips; this config has no vid_size"),
    (dict(grad_skip=1, grad_clip=0.0), "'grad_skip' skips updates whose gradient norm exceeds grad_clip, which is 0"),
    (dict(drop_label=0.1, txt_size=0, text=None, cfg=0.0, cond_top_only=0),
     "'drop_label' (0.1) drops captions, and this model has none"),
    (dict(temporal_causal=1), "'temporal_causal' (1) acts on video clips, and this config trains on images"),
    (dict(TINY_VIDEO, secondary_data="x", secondary_ratio=0.0), "'secondary_data' (x) is used on a secondary_ratio share of the"),
    (dict(txt_size=0, text=None, cfg=0.0, drop_label=0.0, cond_top_only=0, fsdp_text_encoder=1),
     "'fsdp_text_encoder' shards the T5 text encoder, and this model has none"),
    (dict(noise_type="uniform", learnable_self_denoiser=1), "'learnable_self_denoiser' learns to remove the Gaussian"),
])
def test_training_keys_that_would_not_act_are_refused_before_anything_loads(tiny_config, digits, config_file, tmp_path,
                                                                            capsys, monkeypatch, keys, message) -> None:
    official = load_config(Path(__file__).resolve().parents[1] / "configs" / "starflow-v_7B_t2v_caus_480p.yaml")
    assert official.loss_scaling  # the official config loads unchanged
    monkeypatch.setattr(launch, "build_trainer", lambda *a, **k: pytest.fail("built before the config was checked"))
    config = config_file(dict(tiny_config, **keys))
    for dry_run in ([], ["--dry_run"]):
        assert main(["train", "--config", str(config), "--data", str(digits["train"]), "--logdir", str(tmp_path / "r"),
                     "--device", "cpu", *dry_run]) == 2
        assert message in capsys.readouterr().err


def test_full_video_recipe_on_two_processes_matches_one(clips, digits, tmp_path) -> None:
    """Secondary images, multi-rate clips, flips, aspect buckets, cond_noise_level, drop_image: the same losses
    on 1 and 2 processes, and some steps train on the secondary images."""
    config = tmp_path / "config.yaml"
    recipe = dict(TINY_VIDEO, vid_size="3:4:8", fps_cond=1, no_flip=0, mix_aspect=1, cond_noise_level=1,
                  secondary_data=str(digits["train"]), secondary_ratio=0.5, secondary_img_size=8,
                  secondary_batch_size=8, data=str(clips), steps=6, save_freq=6, batch_size=4)
    config.write_text(yaml.safe_dump(recipe))
    runs = {}
    for name, nproc in (("one", 1), ("two", 2)):
        r = subprocess.run(train_cmd(config, tmp_path / name, nproc), env=run_env(tmp_path), capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = losses(tmp_path / name)
    assert {m["secondary"] for m in runs["one"].values()} == {0.0, 1.0}
    for step, m in runs["one"].items():
        for key in ("loss", "denoiser_loss"):
            assert runs["two"][step][key] == pytest.approx(m[key], rel=1e-5), (step, key)
