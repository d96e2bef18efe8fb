"""The official sampling flags: attention temperature, guide_top, annealed guidance, Jacobi iteration cap,
return_sequence, random aspect ratios, out_fps, the denoising controls, save_folder, dry runs, settings.json; and the
sampling temperature (this package's own)."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from starflow.assets import DEMO_DIR
from starflow.cli import main
from starflow.data.aspect import aspect_to_size
from starflow.data.video import read_video
from starflow.models.kv_cache import KVCache
from starflow.models.layers import Attention
from starflow.prompts import prompt_from_config
from starflow.sampling.batch import sample_aspect_ratios
from starflow.sampling.denoise import learned_denoise, self_denoise
from starflow.sampling.pipeline import Pipeline, Profile, SampleSettings

from helpers import video_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a handwritten digit 3", "a handwritten digit 8"]


@pytest.fixture(scope="module")
def demo() -> Pipeline:
    return Pipeline.from_pretrained(DEMO_DIR)


def run_cli(*args: str) -> int:
    return main(["sample", "--device", "cpu", *args])


# ---------------------------------------------------------------------- guidance controls
def test_query_scale_divides_the_attention_logits_of_its_rows() -> None:
    torch.manual_seed(0)
    attn = Attention(32, 16)
    x = torch.randn(2, 5, 32)
    cache = KVCache(1, 2, 2, 5, 16)
    cache.query_scale = torch.tensor([1.0, 1 / 3.0]).view(2, 1, 1, 1)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    out = attn(x, None, causal, cache=cache.layer(0), start=0)
    # by hand: row 1's logits divided by 3
    q, k, v = attn.qkv(attn.norm(x)).view(2, 5, 3, 2, 16).permute(2, 0, 3, 1, 4).unbind(0)
    ref = [F.scaled_dot_product_attention(q[r : r + 1], k[r : r + 1], v[r : r + 1], attn_mask=causal,
                                          scale=1 / (math.sqrt(16) * t)) for r, t in enumerate((1.0, 3.0))]
    ref = attn.proj(torch.cat(ref).transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


def test_attn_temp_acts_on_the_unconditional_rows_only(make_pipeline) -> None:
    pipe = make_pipeline(cond_top_only=0)
    base = SampleSettings(cfg=2.0, jacobi=False, self_denoise=False)
    plain = pipe(PROMPTS, base, seeds=[0, 1])
    assert torch.equal(pipe(PROMPTS, SampleSettings(**{**vars(base), "attn_temp": 1.0}), seeds=[0, 1]), plain)
    import starflow.models.jacobi as jacobi_module

    first_guided: list[tuple[torch.Tensor, torch.Tensor]] = []  # (a, b) [cond; uncond] of each run's first guidance
    guide, calls = jacobi_module.guide, []

    def spy(a, b, w):
        if not calls:
            first_guided.append((a.clone(), b.clone()))
        calls.append(1)
        return guide(a, b, w)

    jacobi_module.guide = spy
    try:
        pipe(PROMPTS, base, seeds=[0, 1])
        calls.clear()
        hot = pipe(PROMPTS, SampleSettings(**{**vars(base), "attn_temp": 4.0}), seeds=[0, 1])
    finally:
        jacobi_module.guide = guide
    assert (hot - plain).abs().max() > 1e-3
    (a_plain, b_plain), (a_hot, b_hot) = first_guided  # the same inputs: only the unconditional rows differ
    assert torch.equal(a_plain[:2], a_hot[:2]) and torch.equal(b_plain[:2], b_hot[:2])
    assert (a_plain[2:] - a_hot[2:]).abs().max() + (b_plain[2:] - b_hot[2:]).abs().max() > 1e-4
    # without guidance there are no unconditional rows: the temperature has nothing to act on, and is refused
    unguided = SampleSettings(cfg=0.0, jacobi=False, self_denoise=False)
    with pytest.raises(ValueError, match="attn_temp acts through classifier-free guidance, which is off"):
        pipe(PROMPTS, SampleSettings(**{**vars(unguided), "attn_temp": 4.0}), seeds=[0, 1])
    jacobi = pipe(PROMPTS, SampleSettings(**{**vars(base), "attn_temp": 4.0, "jacobi": True, "jacobi_th": 0.0,
                                             "jacobi_block_size": 8, "jacobi_max_iter": 8}), seeds=[0, 1])
    torch.testing.assert_close(jacobi, hot, atol=1e-4, rtol=1e-4)  # its fixed point is the sequential result


def test_guide_top_guides_only_the_first_blocks(make_pipeline) -> None:
    pipe = make_pipeline(cond_top_only=0)  # three text-conditioned blocks
    s = dict(cfg=2.0, jacobi=False, self_denoise=False)
    guided = pipe(PROMPTS, SampleSettings(**s), seeds=[0, 1])
    assert torch.equal(pipe(PROMPTS, SampleSettings(**s, guide_top=3), seeds=[0, 1]), guided)
    unguided = pipe(PROMPTS, SampleSettings(**{**s, "cfg": 0.0}), seeds=[0, 1])
    with pytest.raises(ValueError, match=r"guide_top 0 guides no flow block, which turns guidance \(cfg 2\) off"):
        pipe(PROMPTS, SampleSettings(**s, guide_top=0), seeds=[0, 1])  # (cfg would be accepted and do nothing)
    top = pipe(PROMPTS, SampleSettings(**s, guide_top=1), seeds=[0, 1])
    assert (top - guided).abs().max() > 1e-4 and (top - unguided).abs().max() > 1e-4
    # guidance in the deep block alone is what a cond_top_only model does in every block it conditions
    deep = []
    pipe(PROMPTS, SampleSettings(**s, guide_top=1), seeds=[0, 1], sequence=deep)
    full = []
    pipe(PROMPTS, SampleSettings(**s), seeds=[0, 1], sequence=full)
    assert torch.equal(deep[1], full[1])  # the deep block's output is the same, the next blocks differ


def test_temperature_scales_the_noise_the_flow_inverts(make_pipeline, monkeypatch) -> None:
    pipe = make_pipeline()
    seen, known = [], []
    inverse = pipe.model.reverse

    def spy(noise, *a, **k):
        seen.append(noise)
        known.append(k.get("known"))
        return inverse(noise, *a, **k)

    monkeypatch.setattr(pipe.model, "reverse", spy)
    base = SampleSettings(cfg=2.0, jacobi=False, self_denoise=False)
    plain = pipe(PROMPTS, base, seeds=[0, 1])
    cold = pipe(PROMPTS, dataclasses.replace(base, temperature=0.5), seeds=[0, 1])
    assert torch.equal(seen[1], 0.5 * seen[0])
    assert (cold - plain).abs().max() > 1e-3
    # inpainting draws its masked noise the same way; the known image's noise (noise_std) is not scaled
    image, mask = torch.rand(2, 1, 8, 8) * 2 - 1, torch.zeros(8, 8)
    mask[4:] = 1
    for t in (1.0, 0.5):
        pipe.inpaint(PROMPTS, image, mask, dataclasses.replace(base, temperature=t), seeds=[0, 1])
    assert torch.equal(seen[3], 0.5 * seen[2]) and torch.equal(known[3], known[2])
    # video: image-to-video, continuation and video-to-video scale the sampled noise, never the known frames
    video = video_pipeline()
    v2v = video_pipeline(video_to_video=1, drop_image=0.0)
    frame, clip = torch.rand(1, 1, 8, 8) * 2 - 1, torch.rand(1, 5, 1, 8, 8) * 2 - 1
    for p in (video, v2v):
        p.model.reverse, p.model.encode_context = _spy_video(p.model)
    vs = SampleSettings(cfg=1.0, jacobi=False, self_denoise=False, target_length=4)
    runs = [lambda s: video(["a"], s, seeds=[0], input_image=frame),
            lambda s: video(["a"], s, seeds=[0], input_video=clip),
            lambda s: v2v.video_to_video(["a"], clip[:, :3], dataclasses.replace(s, target_length=None), seeds=[0])]
    for run in runs:
        for p in (video, v2v):
            p.model.calls.clear()
        run(vs)
        run(dataclasses.replace(vs, temperature=0.5))
        calls = video.model.calls + v2v.model.calls
        (noise1, ctx1), (noise2, ctx2) = calls
        assert torch.equal(noise2, 0.5 * noise1) and torch.equal(ctx1, ctx2)
    # editing decodes the image's own noise: a temperature is refused, not ignored
    with pytest.raises(ValueError, match="temperature 0.5 would not scale"):
        pipe.edit(PROMPTS, PROMPTS, image, dataclasses.replace(base, temperature=0.5), seeds=[0, 1])


def _spy_video(model):
    """``(reverse, encode_context)`` of ``model`` that record ``(noise, noised context)`` in ``model.calls``."""
    model.calls, reverse, encode = [], model.reverse, model.encode_context

    def encode_context(x, *a, **k):
        model.context = x
        return encode(x, *a, **k)

    def spy(noise, *a, **k):
        model.calls.append((noise, model.context))
        return reverse(noise, *a, **k)

    return spy, encode_context


def test_temperature_from_the_flag(tmp_path: Path, capsys) -> None:
    base = ["--caption", "a handwritten digit 4", "--num_samples", "1", "--cfg", "2"]
    assert run_cli(*base, "--temperature", "0.7", "--output_dir", str(tmp_path / "a")) == 0
    record = json.loads((tmp_path / "a" / "settings.json").read_text())
    assert record["settings"]["temperature"] == 0.7
    # the denoising step taken, its defaults resolved: the image demo takes Tweedie's (it has no learned denoiser)
    assert record["denoising"] == {"kind": "tweedie", "step": 1.0, "noise_std": 0.1}
    assert run_cli(*base, "--temperature", "0", "--output_dir", str(tmp_path / "b")) == 2
    assert "config key 'temperature' scales the sampling noise and must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    with pytest.raises(SystemExit):  # editing has no such flag: it draws no noise
        main(["edit", "--input_image", "x.png", "--caption", "a", "--source_caption", "b", "--temperature", "0.5"])
    assert "unrecognized arguments: --temperature 0.5" in capsys.readouterr().err


def test_guidance_flags_need_guidance_and_range(tmp_path: Path, capsys) -> None:
    for flags, phrase in [(["--attn_temp", "2"], "--attn_temp acts through classifier-free guidance"),
                          (["--guide_top", "1"], "--guide_top acts through"),
                          (["--annealed_guidance"], "--annealed_guidance acts through"),
                          (["--cfg", "-3"], "--cfg -3: the guidance weight must be >= 0"),
                          (["--cfg", "1", "--attn_temp", "0"], "--attn_temp 0: the attention temperature must be > 0"),
                          (["--jacobi_max_iter", "0"], "--jacobi_max_iter 0: must be >= 1"),
                          (["--denoising_batch_size", "0"], "--denoising_batch_size 0: must be >= 1"),
                          (["--aspect_ratio", "random"], "mix_aspect 0"),
                          (["--out_fps", "8"], "--out_fps is for video configs"),
                          (["--disable_learnable_denoiser"], "no learnable denoiser"),
                          (["--finetuned_vae", "vae_dir"], "'finetuned_vae'")]:
        out = tmp_path / "never"
        assert run_cli("--caption", "x", "--cfg", "0", *flags, "--output_dir", str(out)) == 2, flags
        err = capsys.readouterr().err
        assert phrase in err and "Traceback" not in err, (flags, err)
        assert not out.exists()


def test_annealed_guidance_and_jacobi_max_iter_reach_the_sampler(tmp_path: Path, demo: Pipeline) -> None:
    base = ["--caption", "a handwritten digit 4", "--num_samples", "2", "--cfg", "2", "--jacobi_block_size", "64"]
    assert run_cli(*base, "--output_dir", str(tmp_path / "a")) == 0
    assert run_cli(*base, "--annealed_guidance", "--jacobi_max_iter", "2", "--output_dir", str(tmp_path / "b")) == 0
    record = json.loads((tmp_path / "b" / "settings.json").read_text())
    assert record["settings"]["anneal_guidance"] and record["settings"]["jacobi_max_iter"] == 2
    assert record["flags"]["annealed_guidance"] and record["flags"]["jacobi_max_iter"] == 2
    a = np.asarray(Image.open(tmp_path / "a" / "00000_a_handwritten_digit_4.png"), dtype=float)
    b = np.asarray(Image.open(tmp_path / "b" / "00000_a_handwritten_digit_4.png"), dtype=float)
    assert np.abs(a - b).max() > 10
    # the iteration cap: 2 Jacobi sweeps over one 64-token chunk stop far from the sequential fixed point,
    # 64 reach it
    s = dict(cfg=2.0, jacobi_block_size=64, jacobi_th=0.0, self_denoise=False)
    seq = demo(PROMPTS, SampleSettings(cfg=2.0, jacobi=False, self_denoise=False), seeds=[0, 1])
    capped = demo(PROMPTS, SampleSettings(**s, jacobi_max_iter=2), seeds=[0, 1])
    full = demo(PROMPTS, SampleSettings(**s, jacobi_max_iter=64), seeds=[0, 1])
    assert (capped - seq).abs().max() > 0.05
    torch.testing.assert_close(full, seq, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------- outputs
def test_return_sequence_writes_every_block_side_by_side(tmp_path: Path, demo: Pipeline) -> None:
    out = tmp_path / "seq"
    assert run_cli("--caption", "a handwritten digit 7", "--num_samples", "2", "--cfg", "1", "--return_sequence",
                   "--save_folder", str(out)) == 0
    sample = np.asarray(Image.open(out / "00001_a_handwritten_digit_7.png"))
    panels = np.asarray(Image.open(out / "00001_a_handwritten_digit_7_sequence.png"))
    h, w = sample.shape[:2]
    stages = demo.model.num_blocks + 2  # the noise, each block's output, the denoised result
    assert panels.shape[:2] == (h, w * stages)
    np.testing.assert_array_equal(panels[:, -w:], sample)  # the last panel is the written sample
    assert np.abs(panels[:, :w].astype(float) - sample).mean() > 20  # the first is the noise
    record = json.loads((out / "settings.json").read_text())
    assert record["flags"]["return_sequence"] and record["flags"]["output_dir"] == str(out)


def test_random_aspect_ratio_draws_per_sample(make_pipeline, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "mixed"
    make_pipeline(mix_aspect=1, img_size=16, txt_size=48).save_pretrained(folder)
    common = ["--checkpoint_path", str(folder), "--caption", "a", "--num_samples", "5", "--jacobi", "0"]
    assert run_cli(*common, "--aspect_ratio", "random", "--sample_batch_size", "2",
                   "--output_dir", str(tmp_path / "r")) == 0
    ratios = sample_aspect_ratios("random", 0, 5)
    assert len(set(ratios)) > 1
    record = json.loads((tmp_path / "r" / "settings.json").read_text())
    assert record["aspect_ratios"] == ratios
    for i, ratio in enumerate(ratios):
        h, w = aspect_to_size(ratio, 16, 2)
        assert Image.open(tmp_path / "r" / f"{i:05d}_a.png").size == (w, h)
    # a sample is the one its ratio gives with a fixed --aspect_ratio (same seed): batches do not mix ratios
    assert run_cli(*common, "--aspect_ratio", ratios[3], "--output_dir", str(tmp_path / "f")) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "r" / "00003_a.png")),
                                  np.asarray(Image.open(tmp_path / "f" / "00003_a.png")))
    capsys.readouterr()  # a ratio outside the nine trained buckets is sampled, with a note said once
    assert run_cli(*common, "--num_samples", "1", "--aspect_ratio", "2:1", "--output_dir", str(tmp_path / "w")) == 0
    assert capsys.readouterr().err.count("note: --aspect_ratio 2:1 is outside the trained buckets") == 1
    assert run_cli(*common, "--num_samples", "1", "--aspect_ratio", "2:1", "--output_dir", str(tmp_path / "w")) == 0
    assert capsys.readouterr().err.count("note: --aspect_ratio 2:1 is outside the trained buckets") == 1  # each run
    # a trained bucket spelled otherwise is that bucket: its size, its name in the prompt, no note
    assert run_cli(*common, "--aspect_ratio", ratios[3].replace(":", ".0:"), "--output_dir", str(tmp_path / "g")) == 0
    assert "outside the trained buckets" not in capsys.readouterr().err
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "g" / "00003_a.png")),
                                  np.asarray(Image.open(tmp_path / "f" / "00003_a.png")))


def test_out_fps_sets_the_prompt_and_the_file(tmp_path: Path) -> None:
    pipe = video_pipeline(fps_cond=1)
    assert "A video with 24 fps" in prompt_from_config("x", pipe.config, fps=24)
    s = dict(cfg=0.0, jacobi=False, self_denoise=False)
    native = pipe(["a"], SampleSettings(**s), seeds=[0])
    assert (pipe(["a"], SampleSettings(**s, fps=24), seeds=[0]) - native).abs().max() > 1e-4
    folder = tmp_path / "video"
    pipe.save_pretrained(folder)
    assert run_cli("--checkpoint_path", str(folder), "--caption", "a", "--num_samples", "1", "--jacobi", "0",
                   "--out_fps", "24", "--output_dir", str(tmp_path / "o")) == 0
    _, fps = read_video(tmp_path / "o" / "00000_a.mp4")
    assert fps == 24


# ---------------------------------------------------------------------- denoising controls
def test_denoising_controls(make_pipeline) -> None:
    torch.manual_seed(0)
    image = make_pipeline()
    x, y = torch.randn(3, 1, 8, 8), image.encode_prompts(["a", "b", "c"])
    profile = Profile()
    tweedie = self_denoise(image.model, x, y, image.config.noise_std)
    torch.testing.assert_close(image._denoise(x, y, SampleSettings(), profile), tweedie)
    half = image._denoise(x, y, SampleSettings(self_denoising_lr=0.5), profile)
    torch.testing.assert_close(half, x + 0.5 * (tweedie - x), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(image._denoise(x, y, SampleSettings(denoising_batch_size=1), profile), tweedie,
                               atol=1e-6, rtol=1e-5)
    other = image._denoise(x, y, SampleSettings(target_noise_std=0.3), profile)
    torch.testing.assert_close(other, self_denoise(image.model, x, y, 0.3))
    assert prompt_from_config("x", image.config.__class__(**{**vars(image.config), "cond_noise_level": True}),
                              noise_std=0.25).startswith("Noise Level 250:")

    video = video_pipeline()  # a learnable denoiser
    v, yv = torch.randn(2, 2, 1, 8, 8), video.encode_prompts(["a", "b"])
    learned = learned_denoise(video.model, v, yv, window=video.trained_latent_frames)
    torch.testing.assert_close(video._denoise(v, yv, SampleSettings(), profile), learned)
    step = learned_denoise(video.model, v, yv, window=video.trained_latent_frames, step=0.1)
    torch.testing.assert_close(video._denoise(v, yv, SampleSettings(self_denoising_lr=0.1), profile), step)
    off = video._denoise(v, yv, SampleSettings(learnable_denoiser=False), profile)
    torch.testing.assert_close(off, self_denoise(video.model, v, yv, video.config.noise_std))
    assert (off - learned).abs().max() > 1e-4


# ---------------------------------------------------------------------- dry run
def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path: Path, capsys) -> None:
    out = tmp_path / "plan"
    assert run_cli("--dry_run", "--caption", "a handwritten digit 1", "--sample_batch_size", "3", "--cfg", "2",
                   "--output_dir", str(out)) == 0
    text = capsys.readouterr().out
    assert "samples: 3 (1 distinct prompt(s)) over 1 process(es), 3 per process in 1 batch(es)" in text
    assert "(1, 8, 8)" in text and "KV cache" in text and "guidance 2" in text
    assert "block auto: 32 for 6 rows on cpu" in text  # what "auto" picks (batch 3 x 2 guidance rows, on a CPU)
    assert not out.exists()
    assert run_cli("--dry_run", "--checkpoint_path", str(tmp_path / "missing"), "--caption", "x") == 2
    assert "--checkpoint_path" in capsys.readouterr().err
    # "auto" decodes a large CPU batch token by token: Jacobi flags given then act on nothing, and a note says so
    assert run_cli("--dry_run", "--caption", "x", "--sample_batch_size", "16", "--cfg", "2", "--jacobi_th", "0.01",
                   "--jacobi_stop", "batch") == 0
    assert ("note: --jacobi_block_size auto decodes 32 rows on cpu token by token (faster there than Jacobi), so "
            "--jacobi_th, --jacobi_stop act on nothing") in capsys.readouterr().err


def test_a_dry_run_under_torchrun_refuses_what_the_sharded_run_would(monkeypatch, capsys) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")  # (as torchrun --nproc_per_node 2 sets it)
    assert run_cli("--dry_run", "--caption", "x", "--fsdp", "1", "--jacobi_stop", "batch", "--jacobi_block_size",
                   "16") == 2
    assert "--jacobi_stop batch stops each rank on its own batch, but the sharded flow" in capsys.readouterr().err
