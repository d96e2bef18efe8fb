"""STARFlow-V: WAN2.2 latents, video folders, video training with the learnable denoiser, image-to-video,
videos longer than trained, and the video sampling command."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from starflow.adapters import build_latent_adapter, build_tiny_wan_vae
from starflow.cli import main
from starflow.config import load_config
from starflow.data.moving_digits import DIRECTIONS, circular_centre, moving_caption, recentre, render_clip
from starflow.data.video import (CorruptVideoError, VideoFolder, clip_indices, read_clip, read_video, video_aspect,
                                 write_video)
from starflow.models import STARFlow

from helpers import TINY_VIDEO, clip_folder

pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------------- WAN2.2 latents
@pytest.fixture(scope="module")
def wan():
    return build_tiny_wan_vae()


def test_wan_layout_normalisation_and_frame_scale(wan) -> None:
    torch.manual_seed(0)
    video = torch.rand(2, 5, 3, 32, 32) * 2 - 1
    z = wan.encode(video, sample=False)
    assert z.shape == (2, 2, 48, 2, 2)  # (5 - 1) / 4 + 1 frames, 16x smaller, 48 channels
    raw = wan.vae.encode(video.permute(0, 2, 1, 3, 4)).latent_dist.mode().permute(0, 2, 1, 3, 4)
    stats = json.loads((Path(__file__).resolve().parents[1] / "starflow/adapters/wan22_latent_stats.json").read_text())
    mean = torch.tensor(stats["latents_mean"]).view(1, 1, -1, 1, 1)
    std = torch.tensor(stats["latents_std"]).view(1, 1, -1, 1, 1)
    expected = (raw - mean) / std
    expected[:, 1:] *= 0.6
    torch.testing.assert_close(z, expected, atol=1e-5, rtol=1e-5)
    image = wan.encode(video[:, 0], sample=False)  # an image is a one-frame video
    torch.testing.assert_close(image, z[:, 0], atol=1e-5, rtol=1e-5)
    pixels = wan.decode(z)
    assert pixels.shape == video.shape
    torch.testing.assert_close(wan.decode(z[:, :1])[:, 0], wan.decode(z[:, 0]))


def test_wan_rejects_bad_frame_counts(wan) -> None:
    with pytest.raises(ValueError, match="4k \\+ 1"):
        wan.encode(torch.zeros(1, 4, 3, 32, 32))


def test_wan_folder_round_trip_with_scale_suffix(wan, tmp_path: Path) -> None:
    wan.save_pretrained(tmp_path / "Wan2.2-tiny" / "vae")  # the Diffusers repo layout: a vae/ subfolder
    loaded = build_latent_adapter(f"{tmp_path / 'Wan2.2-tiny'}:0.6", channels=48)
    assert loaded.frame_scale == 0.6 and loaded.downsample == 16 and loaded.temporal_downsample == 4
    video = torch.rand(1, 5, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(loaded.encode(video, sample=False), wan.encode(video, sample=False))
    # loaded onto a device, the latent statistics go with the weights (a CPU mean with CUDA latents cannot subtract)
    elsewhere = build_latent_adapter(f"{tmp_path / 'Wan2.2-tiny'}:0.6", channels=48, device="meta")
    assert {t.device.type for t in [*elsewhere.parameters(), *elsewhere.buffers()]} == {"meta"}
    assert {t.device.type for t in build_tiny_wan_vae(device="meta").buffers()} == {"meta"}
    with pytest.raises(ValueError, match="channel_size=4"):
        build_latent_adapter(f"{tmp_path / 'Wan2.2-tiny'}:0.6", channels=4)
    with pytest.raises(FileNotFoundError, match="WAN2.2 VAE"):
        build_latent_adapter(f"{tmp_path / 'missing-wan'}:0.6", channels=48)


# ---------------------------------------------------------------------- video folders
def test_lossless_video_round_trip(tmp_path: Path) -> None:
    digit = (np.arange(64).reshape(8, 8) * 4).astype(np.uint8)
    clip = render_clip(digit, 6, 12, (3, 5), "left")
    write_video(tmp_path / "c.mp4", clip, 8, lossless=True)
    frames, fps = read_video(tmp_path / "c.mp4")
    assert fps == 8 and frames.shape == (6, 12, 12, 3)
    assert np.abs(frames[..., 0].astype(int) - clip).max() <= 1


@pytest.mark.parametrize("fps", [8, 16, 24, 10])
def test_a_gif_lasts_frames_over_fps(tmp_path: Path, fps: int) -> None:
    """GIF frame times are whole hundredths of a second: the durations alternate so that the clip lasts T / fps
    (one rounded duration, 0.12 s at 8 fps, would play it at 8.33 fps), and reading it back gives frames over that
    duration (FFmpeg's average rate of a GIF is its first frame's: 8.33)."""
    from starflow.data.video import video_length, write_gif

    frames = np.random.default_rng(0).integers(0, 256, (20, 8, 8), dtype=np.uint8)
    path = write_gif(tmp_path / "c.gif", frames, fps)
    with Image.open(path) as gif:
        durations = []
        for i in range(gif.n_frames):
            gif.seek(i)
            durations.append(gif.info["duration"])
    assert len(durations) == 20 and sum(durations) == 10 * round(20 * 100 / fps)  # (whole hundredths)
    assert max(durations) - min(durations) <= 10
    played = 20 / (sum(durations) / 1000)  # frames per second as a player shows them: fps, up to the hundredths
    assert read_video(path)[1] == pytest.approx(played) and video_length(path) == (20, pytest.approx(played))
    assert read_clip(path, lambda n, rate: [0, 5])[1] == pytest.approx(played) and abs(played - fps) < 0.1


def test_a_rotated_video_is_read_as_players_show_it(tmp_path: Path) -> None:
    """A phone's portrait video: landscape frames stored with a 90 degree display rotation."""
    av = pytest.importorskip("av")
    stored = np.zeros((5, 8, 16, 3), np.uint8)  # (T, H, W, 3): 16 wide, 8 high as stored
    for t in range(5):
        stored[t, :, : 2 + 2 * t] = 255  # a bar growing to the right, so each frame and the turn are told apart
    path = tmp_path / "portrait.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt, stream.options = 16, 8, "yuv444p", {"qp": "0"}
        stream.set_display_rotation(90)  # counter-clockwise, as players apply it
        for frame in stored:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    shown = np.rot90(stored, 1, axes=(1, 2))  # (T, 16, 8, 3): 8 wide, 16 high
    frames, _ = read_video(path)
    assert frames.shape == shown.shape and np.abs(frames.astype(int) - shown).max() <= 2
    clip, _ = read_clip(path, lambda n, fps: [3, 4])
    assert np.abs(clip.astype(int) - shown[3:]).max() <= 2
    assert video_aspect(path) == "9:16"  # portrait (the nearest trained ratio): the stored 2:1 turned


@pytest.mark.parametrize("fmt", ["mp4", "gif"])
def test_read_clip_decodes_only_up_to_the_clip(tmp_path: Path, monkeypatch, fmt: str) -> None:
    """The clip equals the full decode's frames at the chosen indices (repeats and the paired halves too); only
    the chosen frames become RGB arrays and decoding stops at the last one. A file that decodes to fewer frames
    than its count is decoded whole and the clip chosen again from its true length."""
    import av

    from starflow.data import video
    from starflow.data.video import write_gif

    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (20, 8, 8), dtype=np.uint8)
    path = write_video(tmp_path / "c.mp4", src, 8, lossless=True) if fmt == "mp4" else \
        write_gif(tmp_path / "c.gif", src, 8)
    full, fps = read_video(path)
    converted = []
    to_ndarray = av.VideoFrame.to_ndarray
    monkeypatch.setattr(av.VideoFrame, "to_ndarray", lambda self, **kw: converted.append(1) or to_ndarray(self, **kw))
    for pick in ([3, 4, 4, 5, 7], [2, 5, 12, 15], list(range(20))):
        converted.clear()
        got, got_fps = read_clip(path, lambda n, rate: pick)
        assert got_fps == fps and np.array_equal(got, full[pick])
        assert len(converted) == len(set(pick))
    gen = torch.Generator().manual_seed(1)  # a random start, as the data loaders draw it
    got, _ = read_clip(io.BytesIO(path.read_bytes()), lambda n, rate: clip_indices(n, rate, 4, rate / 2, generator=gen))
    want = clip_indices(20, fps, 4, fps / 2, generator=torch.Generator().manual_seed(1))
    assert np.array_equal(got, full[want])

    counts = []
    monkeypatch.setattr(video, "_scan_stream", lambda p: video._StreamScan(25, fps, None, []))  # more than decode
    got, _ = read_clip(path, lambda n, rate: counts.append(n) or [n - 3, n - 1])
    assert counts == [25, 20] and np.array_equal(got, full[[17, 19]])


SEEK_CASES = {  # container: (codec, options), keyframes every 8 frames
    "mp4": ("libx264", {"g": "8", "keyint_min": "8", "sc_threshold": "0", "crf": "0", "bf": "2"}),
    "mkv": ("libx264", {"g": "8", "keyint_min": "8", "sc_threshold": "0", "crf": "10", "bf": "3",
                        "x264-params": "open_gop=1"}),
    "webm": ("libvpx-vp9", {"g": "8", "lossless": "1"}),
}


@pytest.mark.parametrize("fmt", sorted(SEEK_CASES))
def test_read_clip_seeks_to_the_keyframe_before_the_clip(tmp_path: Path, monkeypatch, fmt: str) -> None:
    """A clip after the first keyframe is decoded from the last keyframe before it (B-frames, an open GOP, VP9),
    and its frames are the full decode's; a seek that does not deliver them falls back to decoding from the start."""
    import av

    from starflow.data import video

    codec, options = SEEK_CASES[fmt]
    src = np.random.default_rng(0).integers(0, 256, (48, 16, 16, 3), dtype=np.uint8)
    path = tmp_path / f"c.{fmt}"
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=8, options=options)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        for frame in src:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    full, fps = read_video(path)
    assert len(full) == 48
    numbered = []
    ranked = video._ranked
    monkeypatch.setattr(video, "_ranked", lambda frames, pts, first: (numbered.append(i) or (i, f)
                                                                      for i, f in ranked(frames, pts, first)))
    for pick in ([30, 31, 33], [8, 9], [47], [5, 20, 40], list(range(17, 48, 3)), [44, 41, 41]):
        numbered.clear()
        got, got_fps = read_clip(path, lambda n, rate: pick)
        assert got_fps == fps and np.array_equal(got, full[pick])
        key = min(pick) // 8 * 8  # decoding after the seek starts at that keyframe and stops at the clip's end
        assert numbered == (list(range(key, max(pick) + 1)) if key else [])
    got, _ = read_clip(io.BytesIO(path.read_bytes()), lambda n, rate: [33, 35])
    assert np.array_equal(got, full[[33, 35]])
    monkeypatch.setattr(video, "_ranked", lambda frames, pts, first: iter(()))  # a seek that finds nothing
    got, _ = read_clip(path, lambda n, rate: [33, 35])
    assert np.array_equal(got, full[[33, 35]])


def test_read_clip_counts_the_frames_that_decode_not_the_header(tmp_path: Path) -> None:
    """An MP4 whose first 4 frames an edit list trims (as ``ffmpeg -ss ... -c copy`` writes): its header counts
    20 frames, 16 decode; clips are cut from the 16, as a full decode would cut them."""
    import av

    src = np.random.default_rng(0).integers(0, 256, (20, 8, 8), dtype=np.uint8)
    write_video(tmp_path / "c.mp4", src, 8, lossless=True)
    with av.open(str(tmp_path / "c.mp4")) as inp, av.open(str(tmp_path / "trimmed.mp4"), "w") as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        shift = 4 * int(1 / (inp.streams.video[0].average_rate * inp.streams.video[0].time_base))
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is not None:
                packet.pts, packet.dts, packet.stream = packet.pts - shift, packet.dts - shift, stream
                out.mux(packet)
    full, fps = read_video(tmp_path / "trimmed.mp4")
    with av.open(str(tmp_path / "trimmed.mp4")) as c:
        assert c.streams.video[0].frames == 20 and len(full) == 16
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        got, _ = read_clip(tmp_path / "trimmed.mp4", lambda n, rate: clip_indices(n, rate, 6, rate, generator=gen,
                                                                                    paired=True))
        want = clip_indices(16, fps, 6, fps, generator=torch.Generator().manual_seed(seed), paired=True)
        assert np.array_equal(got, full[want])


def test_read_clip_counts_from_the_first_keyframe(tmp_path: Path) -> None:
    """A Matroska file cut mid-GOP (packets from the 3rd on, no edit list): the decoder drops the frames before
    the first keyframe; paired clips are cut from the frames that decode, as a full decode would cut them."""
    import av

    frames = np.random.default_rng(0).integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    with av.open(str(tmp_path / "gop.mp4"), "w") as out:
        stream = out.add_stream("libx264", rate=8, options={"g": "12", "keyint_min": "12", "sc_threshold": "0",
                                                             "crf": "0"})
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    with av.open(str(tmp_path / "gop.mp4")) as inp, av.open(str(tmp_path / "cut.mkv"), "w") as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        packets = sorted((p for p in inp.demux(inp.streams.video[0]) if p.dts is not None), key=lambda p: p.dts)
        for packet in packets[2:]:
            packet.stream = stream
            out.mux(packet)
    full, fps = read_video(tmp_path / "cut.mkv")
    assert len(full) < 38  # the cut GOP's other frames do not decode
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        got, _ = read_clip(tmp_path / "cut.mkv", lambda n, rate: clip_indices(n, rate, 6, rate, generator=gen,
                                                                                paired=len(full) % 2 == 0))
        want = clip_indices(len(full), fps, 6, fps, generator=torch.Generator().manual_seed(seed),
                            paired=len(full) % 2 == 0)
        assert np.array_equal(got, full[want])


def test_video_folder_clips_fps_and_bad_files(tmp_path: Path) -> None:
    root = clip_folder(tmp_path, n=3, frames=6)
    (root / "broken.mp4").write_bytes(b"not a video")
    write_video(root / "short.mp4", np.zeros((2, 8, 8), np.uint8), 8, lossless=True)
    meta = (root / "metadata.jsonl").read_text()
    (root / "a_folder.mp4").mkdir()
    extra = [{"file_name": "broken.mp4", "text": "x"}, {"file_name": "short.mp4", "text": "y"},
             {"file_name": "gone.mp4", "text": "z"}, {"file_name": "a_folder.mp4", "text": "w"}]
    (root / "metadata.jsonl").write_text(meta + "\n".join(json.dumps(e) for e in extra) + "\n")
    ds = VideoFolder(root, frames=3, fps=4, size=(8, 8), channels=1, random_start=False)
    assert len(ds) == 5 and "gone.mp4" in ds.report() and "5 usable of 7 listed" in ds.report()
    assert ds.skipped[str(root / "a_folder.mp4")] == "a folder, not a file"
    assert clip_indices(6, 8.0, 3, 4, random_start=False) == [0, 2, 4]  # 8 fps source at 4 fps: every other frame
    with pytest.raises(CorruptVideoError, match="shorter than a clip"):
        clip_indices(4, 8.0, 3, 4, random_start=False)
    items = [ds[i] for i in range(len(ds))]
    assert all(item["pixels"].shape == (3, 1, 8, 8) for item in items)
    assert len(ds.skipped) == 4 and "3 usable of 7 listed, 4 skipped" in ds.report()  # missing, folder, undecodable,
    # too short
    frames, _ = read_video(root / "0.mp4")
    expected = torch.from_numpy(frames[[0, 2, 4], ..., 0].astype(np.float32))[:, None] / 127.5 - 1
    torch.testing.assert_close(items[0]["pixels"], expected)


# ---------------------------------------------------------------------- training and sampling
@pytest.fixture(scope="module")
def video_run(tmp_path_factory, one_thread) -> Path:
    """``starflow train`` on moving digits for 3 steps (learnable denoiser, drop_image 0.5)."""
    tmp = tmp_path_factory.mktemp("video_train")
    data = clip_folder(tmp / "clips")
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump(dict(TINY_VIDEO, sample_freq=3)))  # a sample grid at the last step
    with torch.random.fork_rng(devices=[]):
        assert main(["train", "--config", str(config), "--data", str(data), "--logdir", str(tmp / "run"),
                     "--device", "cpu"]) == 0
    return tmp / "run"


def test_video_training_updates_flow_and_denoiser(video_run: Path) -> None:
    grid = Image.open(video_run / "samples" / "step_00000003.png")  # 4 filmstrips of 3 frames a row, shown 8x
    assert grid.width == (4 * (3 * 8 + 1) + 1) * 8
    metrics = [json.loads(line) for line in (video_run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and all(np.isfinite(m["denoiser_loss"]) for m in metrics)
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(video_run / "checkpoints" / "step_00000003", video_run / "consolidated.pt")
    state = torch.load(video_run / "consolidated.pt", weights_only=False)
    assert state["denoiser_optimizer"]["state"], "the denoiser optimizer never stepped"
    flow_names = {n for g in state["optimizer"]["param_groups"] for n in g["params"]}
    den_names = {n for g in state["denoiser_optimizer"]["param_groups"] for n in g["params"]}
    cfg = load_config(video_run / "config.yaml")
    model = STARFlow.from_config(cfg, txt_dim=32)
    names = {n for n, _ in model.named_parameters()}
    assert den_names == {n for n in names if n.startswith("learnable_self_denoiser.")}
    assert flow_names == names - den_names


def test_an_unreadable_clip_is_said_once_on_a_line_of_its_own(tmp_path: Path) -> None:
    """Each epoch's new DataLoader workers skip a clip found undecodable without saying so again, and the warning
    starts a line of its own while the progress bar is shown."""
    import os
    import subprocess
    import sys

    data = clip_folder(tmp_path / "clips", n=4)
    (data / "1.mp4").write_bytes(b"not a video")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(dict(TINY_VIDEO, num_workers=1, steps=6, save_freq=6, batch_size=2)))  # 3 epochs
    argv = [sys.executable, "-m", "starflow.cli", "train", "--config", str(config), "--data", str(data), "--logdir",
            str(tmp_path / "run"), "--device", "cpu"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.count("skipping video") == 1, r.stderr[-3000:]
    assert f"\nwarning: skipping video {data / '1.mp4'} (cannot decode" in r.stderr, r.stderr[-3000:]


def test_denoiser_target_is_the_scaled_likelihood_gradient() -> None:
    cfg = load_config(TINY_VIDEO)
    torch.manual_seed(0)
    model = STARFlow.from_config(cfg, txt_dim=32)
    x = torch.randn(2, 3, 1, 8, 8, requires_grad=True)
    y = torch.randn(2, 48, 32)
    model.loss(x, y)["loss"].backward()
    target = cfg.noise_std * x.numel() * x.grad
    xg = x.detach().requires_grad_(True)
    nll_sum = (model.nll(xg, y) * xg[0].numel()).sum()  # per-sample NLL summed over dims
    (grad,) = torch.autograd.grad(nll_sum, xg)
    torch.testing.assert_close(target, cfg.noise_std * grad, rtol=1e-4, atol=1e-6)


def _random_video_model(seed: int = 0) -> STARFlow:
    torch.manual_seed(seed)
    model = STARFlow.from_config(load_config(TINY_VIDEO), txt_dim=32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proj_out.weight" in name or "final_norm.weight" in name:
                p.add_(0.05 * torch.randn_like(p))
    return model


def test_long_video_first_window_is_the_short_video() -> None:
    model = _random_video_model()
    torch.manual_seed(1)
    noise, y = torch.randn(2, 9, 1, 8, 8), torch.randn(2, 48, 32)
    long = model.reverse(noise, y, window=3, context_frames=2)
    short = model.reverse(noise[:, :3], y)
    assert long.shape == noise.shape
    torch.testing.assert_close(long[:, :3], short)
    # a window continues from its context: changing a frame inside the first window changes later frames
    assert not torch.allclose(long[:, 3:], model.reverse(noise[:, 3:], y))
    with pytest.raises(ValueError, match="context_frames"):
        model.reverse(noise, y, window=3, context_frames=3)


def test_each_window_continues_from_the_last_frames_decoded_under_the_extend_caption() -> None:
    """Sliding windows (SPEC section 11): every window after the first decodes after the last ``context_frames``
    frames decoded so far, as its prefix, with the continuation text (``y_extend``, the ``(extend) `` caption)."""
    model = _random_video_model()
    torch.manual_seed(1)
    noise, y, y_extend = torch.randn(2, 9, 1, 8, 8), torch.randn(2, 48, 32), torch.randn(2, 48, 32)
    calls, original = [], model._reverse_sequence

    def spy(i, grid, y_i, *args, **kwargs):
        out = original(i, grid, y_i, *args, **kwargs)
        prefix = kwargs.get("prefix", args[6] if len(args) > 6 else None)
        calls.append((i, y_i, None if prefix is None else prefix.clone(), out.clone()))
        return out

    model._reverse_sequence = spy
    model.reverse(noise, y, window=3, context_frames=2, y_extend=y_extend)
    deep = [c for c in calls if c[2] is not None]  # the windows after the first (the frame-local blocks have none)
    i = deep[0][0]
    windows = [c for c in calls if c[0] == i]
    assert len(windows) == 7 and all(c[0] == i for c in deep)  # 3 frames, then 6 windows of 2 context + 1 new
    first_y, _, decoded = windows[0][1:]
    assert torch.equal(first_y, y)
    for _, y_i, prefix, out in windows[1:]:
        assert torch.equal(y_i, y_extend)
        assert torch.equal(prefix, decoded[:, -2:])  # the last 2 frames decoded so far
        assert torch.equal(out[:, :2], prefix)
        decoded = torch.cat([decoded, out[:, 2:]], 1)


def test_video_jacobi_chunks_longer_than_a_frame_read_only_defined_inputs(monkeypatch) -> None:
    """A 4 x 8 token chunk after the first frame (16 tokens a frame) starts from the window one frame back,
    which reaches past the chunk's start: those inputs must be the current guess, never unset memory."""
    model = _random_video_model()
    torch.manual_seed(3)
    noise, y = torch.randn(2, 3, 1, 8, 8), torch.randn(2, 48, 32)

    def poisoned(like, *args, **kwargs):  # what uninitialised memory may hold
        return torch.full_like(like, float("nan"), *args, **kwargs)

    monkeypatch.setattr(torch, "empty_like", poisoned)
    jacobi = model.reverse(noise, y, jacobi=True, jacobi_block_size=8, jacobi_th=0.0, jacobi_max_iter=40)
    monkeypatch.undo()
    assert torch.isfinite(jacobi).all()
    torch.testing.assert_close(jacobi, model.reverse(noise, y), atol=1e-4, rtol=1e-4)


def test_image_to_video_keeps_the_prefix_and_matches_plain_decoding() -> None:
    model = _random_video_model()
    torch.manual_seed(2)
    noise, y = torch.randn(2, 3, 1, 8, 8), torch.randn(2, 48, 32)
    x = model.reverse(noise, y)  # a sample; its first frame as a prefix must give back the same video
    ctx = model.encode_context(x[:, :1], y)
    again = model.reverse(noise, y, context=ctx)
    torch.testing.assert_close(again[:, :1], x[:, :1])
    torch.testing.assert_close(again, x, atol=1e-4, rtol=1e-4)


def test_windowed_learned_denoiser_matches_whole_windows() -> None:
    from starflow.sampling import learned_denoise

    model = _random_video_model()
    x, y = torch.randn(1, 7, 1, 8, 8), torch.randn(1, 48, 32)
    whole = learned_denoise(model, x, y)
    torch.testing.assert_close(whole, x - 0.3 * model.denoiser(x, y))
    windowed = learned_denoise(model, x, y, window=3)
    torch.testing.assert_close(windowed[:, :3], x[:, :3] - 0.3 * model.denoiser(x[:, :3], y))
    assert windowed.shape == x.shape and not torch.equal(windowed, x)
    assert model.config.denoiser_window == 1  # each later window starts one frame back and keeps its 2 new frames
    for start in (2, 4):
        later = x[:, start + 1 : start + 3] - 0.3 * model.denoiser(x[:, start : start + 3], y)[:, 1:]
        torch.testing.assert_close(windowed[:, start + 1 : start + 3], later)


def test_a_denoiser_without_window_sees_a_full_window_of_past_frames() -> None:
    """Without ``denoiser_window`` the denoiser attended to the whole clip in training: each later window carries
    all its other frames (one new frame per pass), so no frame is denoised without past context."""
    from starflow.sampling import learned_denoise

    torch.manual_seed(0)
    model = STARFlow.from_config(load_config(dict(TINY_VIDEO, denoiser_window=None)), txt_dim=32).eval()
    with torch.no_grad():  # its zero-initialised output layers get weights: a denoiser that reads its context
        for p in (model.learnable_self_denoiser.proj_out.weight, model.learnable_self_denoiser.final_norm.weight):
            p.add_(0.5 * torch.randn_like(p))
    x, y = torch.randn(1, 5, 1, 8, 8), torch.randn(1, 48, 32)
    out = learned_denoise(model, x, y, window=3)
    for frame in (3, 4):  # each the last frame of the window that ends with it
        d = model.denoiser(x[:, frame - 2 : frame + 1], y)[:, -1]
        torch.testing.assert_close(out[:, frame], x[:, frame] - 0.3 * d)


def test_sample_video_command(video_run: Path, tmp_path: Path) -> None:
    image = tmp_path / "digit.png"
    Image.fromarray((np.arange(64).reshape(8, 8) * 4).astype(np.uint8)).save(image)
    out = tmp_path / "i2v"
    assert main(["sample", "--checkpoint_path", str(video_run / "model"), "--caption", "a handwritten digit 3 moving left",
                 "--input_image", str(image), "--target_length", "7", "--gif", "--num_samples", "1", "--output_dir", str(out),
                 "--device", "cpu", "--cfg", "1.5"]) == 0
    stem = out / "00000_a_handwritten_digit_3_moving_left"
    frames, fps = read_video(stem.with_suffix(".mp4"))
    assert frames.shape[0] == 7 and fps == 8
    poster = np.asarray(Image.open(stem.with_suffix(".png")))
    assert poster.shape == (8, 7 * 8)
    np.testing.assert_array_equal(poster[:, :8], np.asarray(Image.open(image)))  # frame 0 is the input image
    assert Image.open(stem.with_suffix(".gif")).n_frames == 7
    assert main(["sample", "--checkpoint_path", str(video_run / "model"), "--caption", "x",
                 "--input_image", str(tmp_path / "missing.png"), "--output_dir", str(out), "--device", "cpu"]) == 2


VIDEO_DEMO = Path(__file__).resolve().parents[1] / "ckpts" / "demo_moving_digits"
REAL_DIGIT = Path(__file__).resolve().parents[1] / "docs" / "real_digit_7.png"


def test_shipped_video_demo_moves_as_prompted() -> None:
    """The shipped STARFlow-V demo at its config's guidance and temperature: 8 videos, two per direction; the
    digit's centre of mass moves the prompted way in at least 7 (benchmarks/moving_digits_quality.py measures it
    on 800)."""
    from starflow.sampling.io import to_uint8
    from starflow.sampling.pipeline import Pipeline, SampleSettings

    pipe = Pipeline.from_pretrained(VIDEO_DEMO)
    assert pipe.config.is_video and pipe.model.learnable_self_denoiser is not None
    names = [name for name in DIRECTIONS for _ in range(2)]
    settings = SampleSettings(cfg=pipe.config.cfg, temperature=pipe.config.temperature)
    pixels = pipe([moving_caption(3 + i, name) for i, name in enumerate(names)], settings,
                  seeds=list(range(len(names))))
    assert pixels.shape == (8, 4, 1, 12, 12)
    moved = 0
    for video, name in zip(to_uint8(pixels.flatten(0, 1))[..., 0].reshape(8, 4, 12, 12), names):
        centres = np.array([circular_centre(f) for f in video])
        step = ((np.diff(centres, axis=0) + 6) % 12 - 6).mean(0)
        moved += bool(np.sign(np.round(step)).astype(int).tolist() == list(DIRECTIONS[name]))
    assert moved >= 7


def test_shipped_video_demo_image_to_video_keeps_the_real_image(tmp_path: Path) -> None:
    out = tmp_path / "i2v"
    assert main(["sample", "--checkpoint_path", str(VIDEO_DEMO), "--caption", "a handwritten digit 7 moving right",
                 "--input_image", str(REAL_DIGIT), "--num_samples", "1", "--output_dir", str(out),
                 "--device", "cpu"]) == 0
    poster = np.asarray(Image.open(out / "00000_a_handwritten_digit_7_moving_right.png"))
    image = np.asarray(Image.open(REAL_DIGIT).convert("L"))
    assert poster.shape == (12, 4 * 12) and image.shape == (12, 12)
    np.testing.assert_array_equal(poster[:, :12], image)  # frame 0 is the input image


def test_input_image_needs_a_video_model(tmp_path: Path, capsys) -> None:
    from starflow.assets import DEMO_DIR

    image = Path(__file__).resolve().parents[1] / "docs" / "real_digit_3.png"
    assert main(["sample", "--checkpoint_path", str(DEMO_DIR), "--caption", "a", "--input_image", str(image),
                 "--output_dir", str(tmp_path / "o"), "--device", "cpu"]) == 2
    assert "video configs" in capsys.readouterr().err


def test_circular_centre_follows_the_motion() -> None:
    digit = np.zeros((8, 8), np.uint8)
    digit[3:5, 3:5] = 255
    clip = render_clip(digit, 4, 12, (0, 10), "right")  # crosses the right edge
    cols = [circular_centre(f)[1] for f in clip]
    steps = [((b - a + 6) % 12) - 6 for a, b in zip(cols, cols[1:])]
    np.testing.assert_allclose(steps, [1, 1, 1], atol=1e-6)


def test_video_to_video_pairs_put_another_digit_on_the_source_path(tmp_path: Path, monkeypatch) -> None:
    """prepare_moving_digits.py --video_to_video: each file is the target clip then the source clip; the target is
    a real digit of the caption's class on exactly the source's path (same box positions frame by frame)."""
    import starflow.data.moving_digits as md
    from starflow.data import load_digit_split

    images, labels = load_digit_split("test")
    monkeypatch.setattr(md, "load_digit_split", lambda split: (images[:6], labels[:6]))
    assert md.write_moving_digits(tmp_path, frames=4, clips_per_digit=2, video_to_video=True) == {"train": 12,
                                                                                                  "test": 12}
    rows = [json.loads(line) for line in (tmp_path / "train" / "metadata.jsonl").read_text().splitlines()]
    for row in rows:
        frames, _ = read_video(tmp_path / "train" / row["file_name"])
        target, source = frames[:4, ..., 0], frames[4:, ..., 0]
        assert frames.shape[0] == 8 and row["text"] == moving_caption(row["label"], row["direction"])
        i = int(row["file_name"][:4])
        assert row["source_label"] == labels[i]
        # the source is digit i moving; the target a digit of the caption's class on the same path
        def same(a, b):  # the H.264 round trip is lossless up to 1 grey level
            return np.abs(a.astype(int) - b).max() <= 1

        boxes = [(r, c) for r in range(12) for c in range(12)
                 if same(render_clip(images[i], 4, 12, (r, c), row["direction"]), source)]
        assert boxes
        donors = [k for k in range(6) if labels[k] == row["label"]]
        assert any(same(render_clip(images[k], 4, 12, boxes[0], row["direction"]), target) for k in donors)


def test_shipped_video_to_video_demo_redraws_a_real_clip_on_its_path() -> None:
    """ckpts/demo_moving_digits_v2v at its config's settings: of 4 real test clips redrawn as other digits, at
    least 3 keep the source's path (centre of mass within 1.5 px on average) and at least 3 are labelled as the
    prompted digit (benchmarks/applications_quality.py (d) measures both on 200)."""
    from starflow.data import load_digit_split
    from starflow.sampling.io import to_uint8
    from starflow.sampling.pipeline import Pipeline, SampleSettings

    pipe = Pipeline.from_pretrained(VIDEO_DEMO.with_name("demo_moving_digits_v2v"))
    assert pipe.config.video_to_video
    images, labels = load_digit_split("test")
    names = list(DIRECTIONS)
    source = np.stack([render_clip(images[i], 4, 12, (3 * i, 5 * i % 12), names[i]) for i in range(4)])
    targets = [(int(labels[i]) + 3) % 10 for i in range(4)]
    out = pipe.video_to_video([moving_caption(k, names[i]) for i, k in enumerate(targets)],
                              torch.from_numpy(source).float()[:, :, None] / 127.5 - 1,
                              SampleSettings(cfg=pipe.config.cfg, temperature=pipe.config.temperature),
                              seeds=[0, 1, 2, 3])
    assert out.shape == (4, 4, 1, 12, 12)
    result = to_uint8(out.flatten(0, 1))[..., 0].reshape(4, 4, 12, 12)
    on_path = 0
    for res, src in zip(result, source):
        d = np.array([circular_centre(f) for f in res]) - np.array([circular_centre(f) for f in src])
        on_path += bool(np.sqrt((((d + 6) % 12 - 6) ** 2).sum(-1)).mean() <= 1.5)
    assert on_path >= 3
    # redrawn as the prompted digit, not copied: every frame recentred on its centre of mass, cropped to 8x8 and
    # labelled by its nearest real train digit rendered and recentred the same way (majority over frames)
    from sklearn.neighbors import KNeighborsClassifier

    train, train_labels = load_digit_split("train")
    rng = np.random.default_rng(0)
    knn = KNeighborsClassifier(3).fit([recentre(render_clip(im, 1, 12, tuple(rng.integers(0, 12, 2)), "left")[0])
                                       .ravel() for im in train], train_labels)

    def label(video):
        return np.bincount(knn.predict([recentre(f).ravel() for f in video]), minlength=10).argmax()

    votes, source_votes = [label(v) for v in result], [label(v) for v in source]
    assert sum(v == k for v, k in zip(votes, targets)) >= 3, (votes, targets)
    assert sum(v == int(labels[i]) for i, v in enumerate(source_votes)) >= 3  # the check reads real clips right


def test_video_to_video_files_are_cut_at_the_same_times_in_both_halves(tmp_path: Path) -> None:
    """A paired file longer than a training pair: target and source halves are cut at one drawn start."""
    n = 12
    pair = np.concatenate([np.arange(n), 100 + np.arange(n)]).astype(np.uint8)  # frame k: grey level = its id
    frames = np.broadcast_to(pair[:, None, None], (2 * n, 8, 8)).copy()
    write_video(tmp_path / "pair.mp4", frames, 8, lossless=True)
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "pair.mp4", "text": "x", "fps": 8}) + "\n")
    seen = set()
    for epoch in range(6):
        data = VideoFolder(tmp_path, frames=8, fps=8, size=(8, 8), channels=1, paired=True, seed=epoch)
        ids = np.rint((data[0]["pixels"][:, 0, 0, 0].numpy() + 1) * 127.5).astype(int)
        assert np.all(np.abs(ids[4:] - 100 - ids[:4]) <= 1), ids  # the source half at the target's times
        assert np.all(np.abs(np.diff(ids[:4]) - 1) <= 1)
        seen.add(int(ids[0]))
    assert len(seen) > 1  # the start is drawn, not always frame 0
    with pytest.raises(CorruptVideoError, match="two halves of equal length"):
        clip_indices(23, 8, 8, 8, paired=True)
