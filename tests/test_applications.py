"""The training-free applications (SPEC section 17): inpainting with teacher-forced known tokens, editing by
inversion, video continuation, video-to-video and the end frame; their commands."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from starflow.adapters import build_text_encoder, build_tiny_wan_vae
from starflow.assets import DEMO_DIR
from starflow.cli import main
from starflow.config import load_config
from starflow.data import load_digit_split
from starflow.data.video import read_video, write_video
from starflow.models import STARFlow
from starflow.models.jacobi import _merge_known_runs
from starflow.models.starflow import patchify
from starflow.sampling.pipeline import Pipeline, SampleSettings, token_mask

from helpers import TINY_VIDEO, video_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
MOVING_DEMO = ROOT / "ckpts" / "demo_moving_digits"


@pytest.fixture(scope="module")
def digits() -> Pipeline:
    return Pipeline.from_pretrained(DEMO_DIR)


@pytest.fixture(scope="module")
def real_digits() -> tuple[torch.Tensor, np.ndarray]:
    images, labels = load_digit_split("test")
    return torch.from_numpy(images[:6]).float()[:, None] / 127.5 - 1, labels[:6]


def _prompts(digits: Pipeline, captions: list[str], guidance: float) -> torch.Tensor:
    y = digits.encode_prompts(captions)
    return torch.cat([y, digits.encode_prompts([""] * len(captions))]) if guidance > 0 else y


LOWER_HALF = torch.zeros(8, 8, dtype=torch.bool)
LOWER_HALF[4:] = True


# ---------------------------------------------------------------------- the model: teacher forcing
@pytest.mark.parametrize("jacobi", [False, True])
def test_known_tokens_are_the_known_activations_in_every_block(digits, real_digits, jacobi: bool) -> None:
    model, (x, _) = digits.model, real_digits
    known = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    y = _prompts(digits, ["a handwritten digit 5"] * len(x), 2.0)
    mask = LOWER_HALF.clone()
    mask[:, :2] = True  # the generated region is not a prefix in either token order
    steps: list[torch.Tensor] = []
    out = model.reverse(torch.randn(x.shape), y, guidance=2.0, jacobi=jacobi, jacobi_block_size=8, known=known,
                        mask=mask, intermediates=steps)
    reference = model(known, y[: len(x)]).outputs
    assert len(steps) == model.num_blocks and torch.equal(steps[-1], out)
    for i, step in zip(reversed(range(model.num_blocks)), steps):  # step = the input of block i
        grid = patchify(step, model.patch_size)
        assert torch.equal(grid[:, ~mask], reference[i][:, ~mask]), model.block_name(i)
        assert not torch.allclose(grid[:, mask], reference[i][:, mask])
    assert torch.equal(out[:, :, ~mask], known[:, :, ~mask])
    # the generated tokens invert their block: its forward pass maps the decoded input back to the noise it was given
    # (unguided, so the forward pass is the exact inverse; KV caches holding wrong known tokens would break it)
    y_plain, noise = y[: len(x)], torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    steps.clear()
    model.reverse(noise, y_plain, jacobi=jacobi, jacobi_block_size=8, jacobi_th=0.0, jacobi_max_iter=64, known=known,
                  mask=mask, intermediates=steps)
    for k, (i, block_input) in enumerate(zip(reversed(range(model.num_blocks)), steps)):
        given = noise if k == 0 else steps[k - 1]
        grid = patchify(block_input, model.patch_size)
        z, _, _ = model.blocks[i](model._to_sequence(grid, i), model._block_text(i, y_plain, grid),
                                  model.block_rope(i, grid.shape, y_plain.shape[1]))
        z = model._from_sequence(z, grid, i)
        torch.testing.assert_close(z[:, mask], patchify(given, model.patch_size)[:, mask], atol=1e-4, rtol=0,
                                   msg=model.block_name(i))


def test_everything_known_gives_the_input_back_in_one_evaluation_per_run(digits, real_digits) -> None:
    from starflow.models.jacobi import DecodeStats

    model, (x, _) = digits.model, real_digits
    y = _prompts(digits, ["a handwritten digit 1"] * len(x), 0.0)
    stats = DecodeStats()
    out = model.reverse(torch.randn(x.shape), y, known=x, mask=torch.zeros(8, 8, dtype=torch.bool), stats=stats)
    assert torch.equal(out, x)
    assert stats.evaluations == sum(1 for b in model.blocks if hasattr(b, "attn_blocks"))


def test_known_runs_become_one_chunk() -> None:
    known = [True, True, False, True, True, True, False, False]
    assert _merge_known_runs([(t, t + 1) for t in range(8)], known) == [(0, 2), (2, 3), (3, 6), (6, 7), (7, 8)]
    assert _merge_known_runs([(0, 4), (4, 8)], known) == [(0, 2), (2, 3), (3, 6), (6, 8)]
    assert _merge_known_runs([(0, 8)], [False] * 8) == [(0, 8)]


def test_jacobi_and_sequential_inpainting_agree(digits, real_digits) -> None:
    (x, _), model = real_digits, digits.model
    y = _prompts(digits, ["a handwritten digit 7"] * len(x), 2.0)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    seq = model.reverse(noise, y, guidance=2.0, known=x, mask=LOWER_HALF)
    jac = model.reverse(noise, y, guidance=2.0, jacobi=True, jacobi_block_size=16, jacobi_th=1e-6, known=x,
                        mask=LOWER_HALF)
    torch.testing.assert_close(jac, seq, atol=1e-3, rtol=1e-3)  # the test of plain Jacobi decoding uses the same


def test_inpainting_rejects_bad_masks(digits, real_digits) -> None:
    x, model = real_digits[0], digits.model
    y = _prompts(digits, ["a"] * len(x), 0.0)
    with pytest.raises(ValueError, match="token grid"):
        model.reverse(torch.randn(x.shape), y, known=x, mask=torch.zeros(4, 4))
    with pytest.raises(ValueError, match="both known"):
        model.reverse(torch.randn(x.shape), y, known=x)


# ---------------------------------------------------------------------- the pipeline: inpainting and editing
def test_inpaint_keeps_the_known_pixels_exactly(digits, real_digits, monkeypatch) -> None:
    x, _ = real_digits
    settings = SampleSettings(cfg=2.0, jacobi=False)
    latents: dict = {}
    calls, reverse = [], digits.model.reverse

    def spy(noise, y, **kwargs):
        out = reverse(noise, y, **kwargs)
        calls.append((kwargs["known"].clone(), out.clone()))
        return out

    monkeypatch.setattr(digits.model, "reverse", spy)
    out = digits.inpaint(["a handwritten digit 9"] * len(x), x, LOWER_HALF, settings, seeds=list(range(len(x))),
                         rounds=2, latents=latents)
    monkeypatch.undo()
    # round 1 is forced to the noised input; round 2 re-encodes round 1's result (SPEC section 17)
    assert len(calls) == 2 and torch.equal(calls[0][0], latents["input"]) and torch.equal(calls[1][0], calls[0][1])
    assert torch.equal(calls[1][1], latents["sampled"])
    assert out.shape == x.shape
    assert torch.equal(out[:, :, :4], x[:, :, :4])
    assert not torch.allclose(out[:, :, 4:], x[:, :, 4:], atol=0.05)
    assert torch.equal(latents["sampled"][:, :, :4], latents["input"][:, :, :4])
    again = digits.inpaint(["a handwritten digit 9"], x[:1], LOWER_HALF, settings, seeds=[0], rounds=2)
    torch.testing.assert_close(again, out[:1])  # per-sample seeds: independent of the batch


def test_token_mask_is_the_max_pooled_pixel_mask() -> None:
    pixels = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    pixels[0, 0, 3, 5] = True
    tokens = token_mask(pixels, 2)
    assert tokens.shape == (1, 4, 4) and tokens.sum() == 1 and tokens[0, 1, 2]


def test_edit_with_the_source_caption_reproduces_the_input(digits, real_digits) -> None:
    x, labels = real_digits
    captions = [f"a handwritten digit {d}" for d in labels]
    latents: dict = {}
    digits.edit(captions, captions, x, SampleSettings(cfg=0.0, jacobi=False), seeds=list(range(len(x))),
                latents=latents)
    torch.testing.assert_close(latents["sampled"], latents["input"], atol=1e-4, rtol=0)
    edited = digits.edit(captions, ["a handwritten digit 8"] * len(x), x, SampleSettings(cfg=1.0),
                         seeds=list(range(len(x))))
    assert (edited - x).abs().max() > 0.3
    masked = digits.edit(captions, ["a handwritten digit 8"] * len(x), x, SampleSettings(cfg=1.0), mask=LOWER_HALF,
                         seeds=list(range(len(x))))
    assert torch.equal(masked[:, :, :4], x[:, :, :4])


def test_a_uniform_dequantisation_model_gets_its_own_known_input_and_no_tweedie_step(real_digits) -> None:
    """``noise_type: uniform``: the known input ``x~`` is the 8-bit dequantisation training saw (within one 8-bit
    bin above the pixels), not Gaussian ``noise_std`` noise, and samples get no Gaussian Tweedie step."""
    import dataclasses

    pipe = Pipeline.from_pretrained(DEMO_DIR)
    pipe.config = dataclasses.replace(pipe.config, noise_type="uniform")
    x, labels = real_digits
    captions = [f"a handwritten digit {d}" for d in labels]
    for run in (lambda lat: pipe.inpaint(captions, x, LOWER_HALF, SampleSettings(cfg=2.0), seeds=list(range(len(x))),
                                         latents=lat),
                lambda lat: pipe.edit(captions, captions, x, SampleSettings(cfg=0.0), seeds=list(range(len(x))),
                                      latents=lat)):
        latents: dict = {}
        run(latents)
        u = (latents["input"] + 1) * 128 - (x + 1) * 127.5  # x~ = ((x + 1) 127.5 + u) / 256 * 2 - 1
        assert u.min() > -1e-4 and u.max() < 1 + 1e-4 and 0.2 < u.std() < 0.4  # u ~ U[0, 1): std 0.289
    denoised, raw = (pipe(captions[:2], SampleSettings(cfg=2.0, self_denoise=flag), seeds=[0, 1]) for flag in (True, False))
    assert torch.equal(denoised, raw)
    with pytest.raises(ValueError, match="^target_noise_std .*noise_type: uniform"):
        pipe(captions[:1], SampleSettings(target_noise_std=0.1))


# ---------------------------------------------------------------------- video: continuation, v2v, end frame
def test_one_frame_of_a_video_model_is_prompted_as_an_image(monkeypatch) -> None:
    """One-frame samples were trained as images ("An image:", fps 0; SPEC sections 12 and 16), and a target_length
    the VAE cannot decode is refused, not rounded down."""
    from starflow.adapters import build_tiny_wan_vae
    from starflow.adapters.text import TextEncoder

    seen = []
    encode = TextEncoder._encode
    monkeypatch.setattr(TextEncoder, "_encode", lambda self, texts: (seen.extend(texts), encode(self, texts))[1])
    pipe = video_pipeline(fps_cond=1)
    out = pipe(["cat"], SampleSettings(cfg=1.0, jacobi=False, target_length=1, self_denoise=False), seeds=[0])
    assert out.shape[1] == 1 and seen == ["An image:\ncat\n", "An image:\n\n"]
    seen.clear()
    pipe(["cat"], SampleSettings(jacobi=False, target_length=2, self_denoise=False), seeds=[0])
    assert seen == [f"A video with {pipe.config.fps} fps:\ncat\n"]
    wan = Pipeline(pipe.model, pipe.text_encoder, build_tiny_wan_vae(), pipe.config)
    with pytest.raises(ValueError, match="target_length 6: the VAE decodes 4k\\+1 frames .* use 5 or 9"):
        wan(["cat"], SampleSettings(target_length=6), seeds=[0])


def test_eval_nll_prompts_a_video_model_with_images_as_images(tmp_path, monkeypatch) -> None:
    """eval-nll scores images: a video model trained with fps_cond saw them as "An image:" (fps 0), so they are
    scored under that prompt, not under the video one of the config's frame rate."""
    from starflow.adapters.text import TextEncoder
    from starflow.evaluation import evaluate_nll

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": "cat"}) + "\n"
                                                   for i in range(2)))
    seen = []
    encode = TextEncoder._encode
    monkeypatch.setattr(TextEncoder, "_encode", lambda self, texts: (seen.extend(texts), encode(self, texts))[1])
    evaluate_nll(video_pipeline(fps_cond=1), str(folder), progress=False)
    assert seen == ["An image:\ncat\n"] * 2


def test_sample_notes_that_one_frame_is_prompted_as_an_image(tmp_path, capsys) -> None:
    folder = tmp_path / "model"
    video_pipeline(fps_cond=1).save_pretrained(folder)
    args = ["sample", "--checkpoint_path", str(folder), "--caption", "cat", "--num_samples", "1", "--device", "cpu",
            "--target_length", "1", "--output_dir", str(tmp_path / "out")]
    assert main([*args, "--out_fps", "4"]) == 0
    assert "note: a one-frame sample is prompted as an image ('An image:')" in capsys.readouterr().out
    assert main(args) == 0 and "prompted as an image" not in capsys.readouterr().out


def test_continuation_keeps_the_clip_and_follows_it() -> None:
    pipe = video_pipeline()
    clip = torch.rand(1, 5, 1, 8, 8) * 2 - 1
    settings = SampleSettings(cfg=1.0, jacobi=False, target_length=4, self_denoise=False)
    out = pipe(["a handwritten digit 2 moving left"], settings, seeds=[0], input_video=clip)
    assert out.shape == (1, 9, 1, 8, 8)
    torch.testing.assert_close(out[:, :5], clip.clamp(-1, 1))  # the clip, then 4 new frames
    other = clip.clone()
    other[:, -1] = -other[:, -1]
    assert not torch.allclose(pipe(["a handwritten digit 2 moving left"], settings, seeds=[0], input_video=other)[:, 5:],
                              out[:, 5:])  # the new frames depend on the context
    with pytest.raises(ValueError, match="input_image"):
        pipe(["a"], settings, input_video=clip, input_image=clip[:, 0])


def test_continuation_checks_the_wan_frame_rules() -> None:
    cfg = load_config(dict(TINY_VIDEO, img_size=32, patch_size=1, channel_size=48, vid_size="5:8",
                           vae="Wan-AI/Wan2.2-TI2V-5B-Diffusers"))
    model = STARFlow.from_config(cfg, txt_dim=32, vae_downsample=16).eval()
    pipe = Pipeline(model, build_text_encoder(cfg), build_tiny_wan_vae(), cfg)
    settings = SampleSettings(jacobi=False, target_length=4)
    out = pipe(["a"], settings, seeds=[0], input_video=torch.rand(1, 5, 3, 32, 32) * 2 - 1)
    assert out.shape == (1, 9, 3, 32, 32)  # 5 + 4 frames: latents 2 + 1
    with pytest.raises(ValueError, match="trim it to 5 frames"):
        pipe(["a"], settings, input_video=torch.zeros(1, 6, 3, 32, 32))
    with pytest.raises(ValueError, match="multiple of 4"):
        pipe(["a"], SampleSettings(target_length=3), input_video=torch.zeros(1, 5, 3, 32, 32))


def test_settings_record_the_target_length_used() -> None:
    """settings.json records --target_length with its default resolved: the frames a continuation adds (whole
    latent frames of the VAE's temporal factor), a video-to-video model's source frames, or the sampled frames."""
    import argparse

    from starflow.cli.sample import used_target_length

    wan = load_config(dict(TINY_VIDEO, img_size=32, patch_size=1, channel_size=48, vid_size="17:8",
                           vae="Wan-AI/Wan2.2-TI2V-5B-Diffusers"))
    plain = load_config(dict(TINY_VIDEO, vid_size="6:8"))
    clip, none = argparse.Namespace(input_video="clip.mp4"), argparse.Namespace(input_video=None)
    assert used_target_length(clip, wan, None) == 16 and used_target_length(clip, wan, 8) == 8
    assert used_target_length(clip, plain, None) == 6
    assert used_target_length(none, wan, None) == 17 and used_target_length(none, plain, 9) == 9
    assert used_target_length(clip, load_config(dict(TINY_VIDEO, vid_size="6:8", video_to_video=True, drop_image=0)),
                              None) == 6


def test_latent_frames_rules() -> None:
    pipe = video_pipeline()
    assert pipe.latent_frames() == pipe.latent_frames(pipe.config.vid_size[0])
    with pytest.raises(ValueError, match="at least one frame, got 0"):  # 0 is not the config's default
        pipe.latent_frames(0)
    image = Pipeline(pipe.model, pipe.text_encoder, pipe.vae, load_config(dict(TINY_VIDEO, vid_size=None)))
    with pytest.raises(ValueError, match="image model"):
        image.latent_frames(5)


def test_video_to_video_and_end_frame_models() -> None:
    v2v = video_pipeline(video_to_video=1, drop_image=0)
    assert v2v.trained_latent_frames == 6
    source = torch.rand(2, 3, 1, 8, 8) * 2 - 1
    settings = SampleSettings(cfg=1.0, jacobi=False)
    out = v2v.video_to_video(["a", "b"], source, settings, seeds=[0, 1])
    assert out.shape == source.shape
    torch.testing.assert_close(v2v.video_to_video(["b"], source[1:], settings, seeds=[1]), out[1:])
    with pytest.raises(ValueError, match="video_to_video"):
        video_pipeline().video_to_video(["a"], source[:1], settings)
    with pytest.raises(ValueError, match="vid_size 3 frames"):
        v2v.video_to_video(["a"], source[:, :2], settings)
    # negative prompts are the unconditional rows: "" is the default, another one changes the sample
    torch.testing.assert_close(v2v.video_to_video(["a", "b"], source, settings, seeds=[0, 1],
                                                  negative_prompts=["", ""]), out)
    assert not torch.allclose(v2v.video_to_video(["a", "b"], source, settings, seeds=[0, 1],
                                                 negative_prompts=["b", "a"]), out)
    for name in ("target_length", "context_length"):  # the source's length is the target's: refused, not ignored
        with pytest.raises(ValueError, match=f"^{name}: video_to_video redraws"):
            v2v.video_to_video(["a"], source[:1], replace(settings, **{name: 5}))

    last = video_pipeline(last_frame_cond=1, drop_image=0)
    end, first = torch.rand(1, 1, 8, 8) * 2 - 1, torch.rand(1, 1, 8, 8) * 2 - 1
    clip = last(["a"], settings, seeds=[0], last_image=end, input_image=first)
    assert clip.shape == (1, 3, 1, 8, 8)
    torch.testing.assert_close(clip[:, 0], first)  # the end frame is not part of the result
    assert last(["a"], settings, seeds=[0], last_image=end).shape == (1, 3, 1, 8, 8)
    # the end frame conditions one window (training clips end at it): a longer video would lose it after the first
    with pytest.raises(ValueError, match="target_length 5: the end frame .* use target_length 3 or less"):
        last(["a"], replace(settings, target_length=5), seeds=[0], last_image=end)
    with pytest.raises(ValueError, match="last_frame_cond"):
        v2v(["a"], settings, last_image=end)
    for name in ("input_image", "last_image"):  # a one-frame clip is not an image
        with pytest.raises(ValueError, match=rf"^{name} \(1, 1, 1, 8, 8\): needs \(B, C, H, W\) pixels .* \(a clip "
                                             r"to continue is input_video\)"):
            last(["a"], settings, **{name: end[:, None]})


# ---------------------------------------------------------------------- commands
def _digit_png(folder: Path, label: int) -> Path:
    images, labels = load_digit_split("test")
    path = folder / f"digit_{label}.png"
    Image.fromarray(images[int(np.flatnonzero(labels == label)[0])]).save(path)
    return path


def test_inpaint_command(tmp_path: Path) -> None:
    image = _digit_png(tmp_path, 4)
    out = tmp_path / "inpaint"
    assert main(["inpaint", "--input_image", str(image), "--mask_box", "0,4,8,8", "--caption", "a handwritten digit 9",
                 "--num_samples", "2", "--rounds", "2", "--output_dir", str(out), "--device", "cpu"]) == 0
    files = {p.name for p in out.iterdir()}
    assert {"result_000.png", "result_001.png", "input.png", "mask.png", "side_by_side.png", "settings.json"} <= files
    original = np.asarray(Image.open(image))
    for name in ("result_000.png", "result_001.png"):
        result = np.asarray(Image.open(out / name))  # at the sampled size, as the input
        assert result.shape == original.shape
        np.testing.assert_array_equal(result[:4], original[:4])
    assert json.loads((out / "settings.json").read_text())["rounds"] == 2
    mask = tmp_path / "mask.png"
    Image.fromarray(np.where(np.arange(8)[:, None] >= 4, 255, 0).repeat(8, 1).astype(np.uint8)).save(mask)
    assert main(["inpaint", "--input_image", str(image), "--mask", str(mask), "--caption", "a handwritten digit 9",
                 "--rounds", "2", "--output_dir", str(tmp_path / "png_mask"), "--device", "cpu"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "png_mask" / "result.png")),
                                  np.asarray(Image.open(out / "result_000.png")))  # same mask, same seed
    assert Image.open(out / "side_by_side.png").size == ((4 * 9 + 1) * 8, 10 * 8)  # 4 padded panels shown 8x larger


@pytest.mark.parametrize("argv, message", [
    (["--mask_box", "0,4,9,8"], "--mask_box 0,4,9,8: needs 0 <= x0 < x1 <= 8"),
    (["--mask_box", "a,b"], "four integers"),
    (["--mask_box", "0,4,8,8", "--rounds", "0"], "--rounds 0"),
    (["--mask_box", "0,4,8,8", "--aspect_ratio", "random"], "--aspect_ratio random draws from the nine trained"),
    (["--mask", "HUGE"], "--mask: cannot read image HUGE"),  # PIL's decompression-bomb limit, one line
])
def test_inpaint_command_rejects_bad_input(tmp_path: Path, capsys, monkeypatch, argv, message) -> None:
    image = _digit_png(tmp_path, 4)
    if "HUGE" in argv:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)  # (the 8x8 input passes, a 16x16 mask is "too large")
        Image.new("L", (16, 16), 255).save(tmp_path / "HUGE", format="PNG")
        monkeypatch.chdir(tmp_path)
    assert main(["inpaint", "--input_image", str(image), "--caption", "x", "--output_dir", str(tmp_path / "o"),
                 "--device", "cpu", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command, argv, message", [
    ("inpaint", ["--jacobi", "0", "--jacobi_th", "1e-3"], "--jacobi_th"),
    ("edit", ["--attn_temp", "2", "--cfg", "0"], "--attn_temp acts through classifier-free guidance"),
    ("inpaint", ["--checkpoint_path", str(MOVING_DEMO)], "inpaint works on image models"),
    ("inpaint", ["--mask_box", "abc"], "--mask_box abc: expected four integers"),
    ("edit", ["--mask_box", "0,0,99,99"], "--mask_box 0,0,99,99: needs 0 <= x0 < x1 <= 8"),
])
def test_inpaint_and_edit_refuse_flags_before_the_weights_load(tmp_path: Path, capsys, monkeypatch, command, argv,
                                                               message) -> None:
    def no_loading(*args, **kwargs):
        raise AssertionError("the weights were loaded before the flags were checked")

    monkeypatch.setattr(Pipeline, "from_pretrained", no_loading)
    captions = ["--caption", "x"] if command == "inpaint" else ["--source_caption", "x", "--caption", "y"]
    assert main([command, "--input_image", str(_digit_png(tmp_path, 4)), "--mask_box", "0,4,8,8", *captions,
                 "--output_dir", str(tmp_path / "o"), "--device", "cpu", *argv]) == 2
    assert message in capsys.readouterr().err


def test_inpaint_names_a_box_too_small_to_cover_a_pixel(tmp_path: Path, capsys) -> None:
    image = tmp_path / "big.png"
    Image.new("L", (64, 64)).save(image)
    assert main(["inpaint", "--input_image", str(image), "--caption", "x", "--mask_box", "0,0,3,3", "--device", "cpu",
                 "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "each sampled pixel spans 8 x 8 input pixels" in err and "centre-cropped" not in err  # (the box is inside)


@pytest.mark.parametrize("text, message", [
    ("a handwritten digit 3 [edit] \n", "line 1: the instruction (after [edit]) is empty"),
    ("\n[edit] a handwritten digit 8\n", "line 2: the caption (before [edit]) is empty"),
    (b"a handwritten digit 3 [edit] a handwritten digit \xff8\n", "not UTF-8 text (byte 0xff on line 1)"),
])
def test_edit_refuses_bad_caption_files(tmp_path: Path, capsys, text, message) -> None:
    edits = tmp_path / "edits.txt"
    edits.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert main(["edit", "--input_image", str(_digit_png(tmp_path, 3)), "--caption_file", str(edits),
                 "--output_dir", str(tmp_path / "o"), "--device", "cpu"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_caption_files_may_start_with_a_byte_order_mark(tmp_path: Path) -> None:
    from argparse import Namespace

    from starflow.cli.edit import read_edits

    edits = tmp_path / "edits.txt"
    edits.write_bytes("a handwritten digit 2 [edit] a handwritten digit 7\r\n".encode("utf-8-sig"))
    assert read_edits(Namespace(caption_file=str(edits), caption=None, source_caption=None)) == [
        ("a handwritten digit 2", "a handwritten digit 7")]


def test_edit_command_reads_official_edit_lines(tmp_path: Path, capsys) -> None:
    image = _digit_png(tmp_path, 3)
    edits = tmp_path / "edits.txt"
    edits.write_text("a handwritten digit 3 [edit] a handwritten digit 8\n\na handwritten digit 3 [edit] "
                     "a handwritten digit 3\n")
    out = tmp_path / "edit"
    assert main(["edit", "--input_image", str(image), "--caption_file", str(edits), "--cfg", "0",
                 "--output_dir", str(out), "--device", "cpu"]) == 0
    record = json.loads((out / "settings.json").read_text())
    assert [e["caption"] for e in record["edits"]] == ["a handwritten digit 8", "a handwritten digit 3"]
    original = np.asarray(Image.open(image)).astype(int)
    same = np.asarray(Image.open(out / "edit_001.png")).astype(int)
    changed = np.asarray(Image.open(out / "edit_000.png")).astype(int)
    assert np.abs(same - original).mean() < np.abs(changed - original).mean()
    assert not (out / "mask.png").exists()
    masked = tmp_path / "edit_masked"  # the lower half may change: the upper half stays, mask.png shows the region
    assert main(["edit", "--input_image", str(image), "--source_caption", "a handwritten digit 3", "--caption",
                 "a handwritten digit 8", "--mask_box", "0,4,8,8", "--output_dir", str(masked), "--device", "cpu"]) == 0
    assert Image.open(masked / "mask.png").size == Image.open(masked / "input.png").size
    top = np.asarray(Image.open(masked / "edit_000.png")).astype(int)[:4]
    assert np.abs(top - original[:4]).max() <= 1  # 8-bit round trip of the known half
    edits.write_text("a handwritten digit 3 to 8\n")
    assert main(["edit", "--input_image", str(image), "--caption_file", str(edits), "--output_dir", str(out),
                 "--device", "cpu"]) == 2
    assert "line 1: expected 'caption [edit] instruction'" in capsys.readouterr().err


def test_sample_continues_a_real_moving_digit_clip(tmp_path: Path) -> None:
    from starflow.data.moving_digits import render_clip

    images, _ = load_digit_split("test")
    clip = render_clip(images[0], 4, 12, (2, 2), "right")
    source = write_video(tmp_path / "clip.mp4", np.repeat(clip[..., None], 3, -1), 8, lossless=True)
    out = tmp_path / "continued"
    assert main(["sample", "--checkpoint_path", str(MOVING_DEMO), "--caption", "a handwritten digit 2 moving right",
                 "--input_video", str(source), "--target_length", "4", "--num_samples", "1", "--output_dir", str(out),
                 "--device", "cpu"]) == 0
    frames, _ = read_video(next(out.glob("*.mp4")))
    assert frames.shape[0] == 8
    assert json.loads((out / "settings.json").read_text())["target_length"] == 4
    assert main(["sample", "--checkpoint_path", str(DEMO_DIR), "--caption", "a", "--input_video", str(source),
                 "--output_dir", str(out), "--device", "cpu"]) == 2
    assert main(["sample", "--checkpoint_path", str(MOVING_DEMO), "--caption", "a", "--last_image",
                 str(tmp_path / "any.png"), "--output_dir", str(tmp_path / "last"), "--device", "cpu"]) == 2
    assert not (tmp_path / "last").exists()  # refused before anything is written


def _audio_only_mp4(path: Path) -> Path:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return path


@pytest.mark.parametrize("flags, message", [
    (["--return_sequence"], "--return_sequence shows a sample drawn from noise"),
    (["--last_frame_cond", "1"], "--last_frame_cond 1: this model was trained without last_frame_cond"),
    (["--video_to_video", "true"], "--video_to_video true: this model was trained without video_to_video"),
    (["--vae", "Wan-AI/Wan2.2-TI2V-5B-Diffusers:0.6", "--channel_size", "48", "--img_size", "64", "--vid_size", "5:8",
      "--target_length", "3"], "--target_length 3: a continuation adds whole latent frames of 4 pixel frames each"),
    (["AUDIO"], "has no video stream"),
])
def test_sample_refuses_a_continuation_before_the_weights_load(tmp_path: Path, capsys, monkeypatch, flags,
                                                               message) -> None:
    def no_loading(*args, **kwargs):
        raise AssertionError("the weights were loaded before the flags were checked")

    monkeypatch.setattr(Pipeline, "from_pretrained", no_loading)
    clip = write_video(tmp_path / "clip.mp4", np.zeros((5, 12, 12, 3), np.uint8), 8, lossless=True)
    if flags == ["AUDIO"]:
        clip, flags = _audio_only_mp4(tmp_path / "audio.mp4"), []
    out = tmp_path / "out"
    for dry in ([], ["--dry_run"]):  # the dry run refuses what sampling refuses
        assert main(["sample", "--checkpoint_path", str(MOVING_DEMO), "--caption", "a handwritten digit 2 moving right",
                     "--input_video", str(clip), *flags, "--output_dir", str(out), "--device", "cpu", *dry]) == 2
        assert message in capsys.readouterr().err
    assert not out.exists()


def test_sample_dry_run_counts_the_input_clip(tmp_path: Path, capsys) -> None:
    clip = write_video(tmp_path / "clip.mp4", np.zeros((9, 12, 12, 3), np.uint8), 32, lossless=True)
    base = ["sample", "--caption", "a handwritten digit 2 moving right", "--input_video", str(clip), "--dry_run"]
    assert main([*base, "--checkpoint_path", str(MOVING_DEMO), "--target_length", "3"]) == 0
    plan = capsys.readouterr().out
    assert "(12, 12, 12)" in plan and "(9 frames) continued by 3 frames" in plan  # the clip, then the new frames
    assert "is 32 fps and its frames are sampled as 8 fps frames" in plan
    assert main([*base, "--checkpoint_path", str(ROOT / "ckpts" / "demo_moving_digits_v2v")]) == 0
    assert "its first 4 frames are redrawn" in capsys.readouterr().out
    short = write_video(tmp_path / "short.mp4", np.zeros((2, 12, 12, 3), np.uint8), 8, lossless=True)
    assert main([*base[:-3], "--input_video", str(short), "--dry_run", "--checkpoint_path",
                 str(ROOT / "ckpts" / "demo_moving_digits_v2v")]) == 2
    assert "2 frame(s); this video_to_video model redraws 4 (vid_size): give a clip of at least 4" \
        in capsys.readouterr().err
    out = tmp_path / "v2v"  # sampling says it too: a 9-frame source of a 4-frame model loses 5 frames
    assert main([*base[:-1], "--checkpoint_path", str(ROOT / "ckpts" / "demo_moving_digits_v2v"), "--num_samples", "1",
                 "--output_dir", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "has 9 frames; the model redraws clips of 4 (vid_size), so its first 4 are redrawn and the rest are left " \
           "out" in printed and "trained for video-to-video" not in printed
    assert main([*base[:-3], "--checkpoint_path", str(ROOT / "ckpts" / "demo_moving_digits_v2v"), "--num_samples", "1",
                 "--output_dir", str(tmp_path / "t2v"), "--device", "cpu"]) == 0  # (runs: said, not refused)
    assert "note: this model was trained for video-to-video (every training sample came with a source clip); " \
           "without --input_video it samples from the caption alone" in capsys.readouterr().out


def test_an_input_of_another_size_is_noted_as_resized(tmp_path: Path, capsys) -> None:
    image = tmp_path / "first.png"
    Image.fromarray(np.zeros((16, 20), np.uint8)).save(image)
    assert main(["sample", "--checkpoint_path", str(MOVING_DEMO), "--caption", "a handwritten digit 2 moving right",
                 "--input_image", str(image), "--num_samples", "1", "--output_dir", str(tmp_path / "out"),
                 "--device", "cpu"]) == 0
    assert f"note: --input_image {image} is 20x16; it is resized and centre-cropped to the samples' 12x12" \
        in capsys.readouterr().out


def test_lossless_mp4s_hold_the_poster_frames_exactly(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["sample", "--checkpoint_path", str(MOVING_DEMO), "--caption", "a handwritten digit 2 moving right",
                 "--num_samples", "1", "--lossless_mp4", "--output_dir", str(out), "--device", "cpu"]) == 0
    mp4 = next(out.glob("*.mp4"))
    frames, _ = read_video(mp4)
    poster = np.asarray(Image.open(mp4.with_suffix(".png")).convert("RGB"))
    assert np.array_equal(np.concatenate(list(frames), axis=1), poster)  # frames side by side
    assert main(["sample", "--caption", "x", "--lossless_mp4", "--output_dir", str(tmp_path / "img"),
                 "--device", "cpu"]) == 2
    assert "--lossless_mp4 is for video configs" in capsys.readouterr().err


def test_the_tag_the_sampler_adds_is_not_doubled(capsys) -> None:
    from argparse import Namespace

    from starflow.cli.sample import without_sampler_tag

    cfg = load_config(ROOT / "ckpts" / "demo_moving_digits_v2v" / "config.yaml")
    args = Namespace(input_video="clip.mp4", last_image=None)
    assert without_sampler_tag(["(v2v) a 3", "a 4"], args, cfg) == ["a 3", "a 4"]
    assert "'(v2v)' itself" in capsys.readouterr().out
    assert without_sampler_tag(["(v2v) a 3"], Namespace(input_video=None, last_image=None), cfg) == ["(v2v) a 3"]


def test_an_animated_input_image_gives_a_note(tmp_path: Path, capsys) -> None:
    frames = [Image.new("L", (12, 12), v) for v in (0, 128, 255)]
    gif = tmp_path / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100)
    assert main(["sample", "--checkpoint_path", str(MOVING_DEMO), "--caption", "a handwritten digit 2 moving right",
                 "--input_image", str(gif), "--num_samples", "1", "--target_length", "2", "--jacobi", "0",
                 "--output_dir", str(tmp_path / "o"), "--device", "cpu"]) == 0
    assert "has 3 frames; only its first is used, as the first frame" in capsys.readouterr().out
    assert main(["sample", "--checkpoint_path", str(MOVING_DEMO), "--caption", "a", "--input_image", str(gif),
                 "--target_length", "1", "--dry_run"]) == 2  # the image alone: nothing to sample
    assert "--target_length 1: --input_image is the first of these frames" in capsys.readouterr().err


def test_inpaint_sizes_its_input_by_the_loaded_vaes_factor(tiny_config, tmp_path: Path, capsys) -> None:
    """A local VAE whose downsampling differs from what its name implies (a tiny SD-style VAE, 2x; the name alone
    says 8x): the input is resized to the size the loaded VAE samples, not to the name's."""
    from starflow.adapters.vae import build_tiny_sd_vae

    vae = build_tiny_sd_vae()
    assert vae.downsample == 2
    vae.vae.save_pretrained(tmp_path / "myvae")
    cfg = load_config(dict(tiny_config, img_size=12, channel_size=4, vae=str(tmp_path / "myvae")))
    text = build_text_encoder(cfg, device="cpu")
    model = STARFlow.from_config(cfg, txt_dim=text.hidden_size, vae_downsample=vae.downsample)
    Pipeline(model, text, vae, cfg).save_pretrained(tmp_path / "model")
    Image.new("RGB", (12, 12), (128, 0, 0)).save(tmp_path / "in.png")
    assert main(["inpaint", "--checkpoint_path", str(tmp_path / "model"), "--input_image", str(tmp_path / "in.png"),
                 "--mask_box", "0,0,8,8", "--caption", "a", "--device", "cpu", "--output_dir", str(tmp_path / "out"),
                 "--jacobi", "0"]) == 0
    assert Image.open(tmp_path / "out" / "result.png").size == (12, 12)
    # its config is valid: the name alone (8x) does not refuse img_size 12; the loaded VAE checks the size
    assert main(["validate", str(tmp_path / "model" / "config.yaml")]) == 0
    assert main(["sample", "--checkpoint_path", str(tmp_path / "model"), "--caption", "a", "--dry_run"]) == 0
    assert main(["sample", "--checkpoint_path", str(tmp_path / "model"), "--caption", "a", "--img_size", "10",
                 "--output_dir", str(tmp_path / "out10")]) == 2
    assert "must be a multiple of the VAE's factor x patch_size (2 x 2 = 4): use 8 or 12" in capsys.readouterr().err


def test_last_image_beyond_one_window_is_refused_from_the_config_alone() -> None:
    """``--last_image`` with a ``--target_length`` longer than the trained clip: refused before sampling (and by
    ``--dry_run``), as the windows after the first would not see the end frame."""
    from argparse import Namespace

    from starflow.cli._video_inputs import check_video_flags

    cfg = load_config(MOVING_DEMO / "config.yaml", {"last_frame_cond": 1, "drop_image": 0})
    flags = dict(input_image=None, input_video=None, last_image="end.png", context_length=None, gif=False,
                 lossless_mp4=False)
    check_video_flags(Namespace(**flags, target_length=cfg.vid_size[0]), cfg)  # one window: fine
    with pytest.raises(ValueError, match=rf"--target_length 8: the end frame \(last_image\) conditions one window of "
                                         rf"the {cfg.vid_size[0]} frames .* use --target_length {cfg.vid_size[0]} or less"):
        check_video_flags(Namespace(**flags, target_length=8), cfg)
