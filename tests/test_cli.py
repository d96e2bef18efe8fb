"""The command line on a tiny model trained for a few steps: sample, eval-nll, model folders, help, the shipped demo."""
from __future__ import annotations

import json
import shutil
import math
import re
from pathlib import Path
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from starflow import assets
from starflow.assets import DEMO_DIR, DEMO_PROMPTS
from starflow.cli import main
from starflow.config import load_config
from starflow.data import ImageFolder, collate, sample_seed
from starflow.evaluation import PIXEL_SCALE_BITS, evaluate_nll
from starflow.models.starflow import HALF_LOG_2PI
from starflow.sampling.pipeline import Pipeline, SampleSettings

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = ["a handwritten digit 3", "a handwritten digit 5"]
EXPECTED_PNGS = ["00000_a_handwritten_digit_3.png", "00001_a_handwritten_digit_3.png",
                 "00002_a_handwritten_digit_5.png", "00003_a_handwritten_digit_5.png"]


@pytest.fixture(scope="module")
def model_dir(tiny_config, digits, tmp_path_factory, one_thread) -> Path:
    """``starflow train`` for 4 steps (guidance weight 1.5 stored in the config); returns ``LOGDIR/model``."""
    tmp = tmp_path_factory.mktemp("cli_train")
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump(dict(tiny_config, steps=4, save_freq=4, cfg=1.5)))
    logdir = tmp / "run"
    with torch.random.fork_rng(devices=[]):
        assert main(["train", "--config", str(config), "--data", str(digits["train"]), "--logdir", str(logdir),
                     "--device", "cpu"]) == 0
    return logdir / "model"


def sample(model_dir: Path, out: Path, *extra: str, captions: list[str] = CAPTIONS) -> int:
    args = ["sample", "--checkpoint_path", str(model_dir), "--num_samples", "2", "--output_dir", str(out),
            "--device", "cpu"]
    for c in captions:
        args += ["--caption", c]
    return main(args + list(extra))


def read_pngs(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("0*.png"))}


def normalised(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------------- sample
def test_model_folder_layout(model_dir: Path) -> None:
    assert (model_dir / "model.safetensors").is_file()
    assert (model_dir / "text_encoder" / "config.json").is_file()  # the tiny-t5 preset travels with the model
    cfg = load_config(model_dir / "config.yaml")
    assert cfg.text == "text_encoder" and cfg.cfg == 1.5 and cfg.img_size == 8


def test_sample_writes_images_grid_and_settings(model_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert sample(model_dir, out, "--sample_batch_size", "3") == 0
    assert "wrote 4 images, grid.png and settings.json" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(EXPECTED_PNGS + ["grid.png", "settings.json"])
    for name in EXPECTED_PNGS:
        with Image.open(out / name) as img:
            assert img.size == (8, 8) and img.mode == "L"
    with Image.open(out / "grid.png") as grid:  # 2 x 2 tiles of 8 + 1 px padding, upscaled 64 // 8 = 8 times
        assert grid.size == ((2 * 9 + 1) * 8, (2 * 9 + 1) * 8)
    record = json.loads((out / "settings.json").read_text())
    assert set(record) == {"captions", "seeds", "checkpoint", "settings", "seed", "world_size", "device", "torch",
                           "starflow", "config", "input_image", "input_video", "last_image", "negative_prompts", "ema",
                           "flags", "denoising"}
    assert record["device"] == "cpu" and record["seeds"] == "seed + i for the i-th caption (seed 0)"
    assert record["captions"] == [CAPTIONS[0]] * 2 + [CAPTIONS[1]] * 2
    assert record["checkpoint"] == str(model_dir) and record["seed"] == 0 and record["world_size"] == 1
    assert record["settings"]["cfg"] == 1.5 and record["settings"]["jacobi"] is True
    assert record["config"]["img_size"] == 8 and record["config"]["cfg"] == 1.5
    pngs = read_pngs(out)
    assert not np.array_equal(pngs[EXPECTED_PNGS[0]], pngs[EXPECTED_PNGS[1]])  # one seed per image


def test_the_grid_shows_at_most_grid_max_samples(model_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """A caption file of 50K prompts writes 50K images but no 50K-tile grid: the grid shows the first GRID_MAX."""
    import starflow.sampling.io as io

    monkeypatch.setattr(io, "GRID_MAX", 2)
    out = tmp_path / "out"
    assert sample(model_dir, out) == 0
    assert "wrote 4 images, grid.png (the first 2) and settings.json" in capsys.readouterr().out
    assert len(EXPECTED_PNGS) == 4 and all((out / name).is_file() for name in EXPECTED_PNGS)
    with Image.open(out / "grid.png") as grid:  # one row of 2 tiles (2 per prompt) of 8 + 1 px padding, 8 times
        assert grid.size == ((2 * 9 + 1) * 8, (1 * 9 + 1) * 8)


def test_sample_is_reproducible_and_seeded(model_dir: Path, tmp_path: Path) -> None:
    for name, extra in (("a", ()), ("b", ()), ("seed1", ("--seed", "1"))):
        assert sample(model_dir, tmp_path / name, "--sample_batch_size", "3", *extra) == 0
    a, b, other = (read_pngs(tmp_path / n) for n in ("a", "b", "seed1"))
    assert list(a) == EXPECTED_PNGS
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not any(np.array_equal(a[k], other[k]) for k in a)


def test_sample_does_not_depend_on_batch_size(model_dir: Path, tmp_path: Path) -> None:
    for bs in ("1", "3", "4"):
        assert sample(model_dir, tmp_path / bs, "--sample_batch_size", bs) == 0
    ref = read_pngs(tmp_path / "4")
    for bs in ("1", "3"):
        got = read_pngs(tmp_path / bs)
        for k in ref:  # per-image seeds; batched float arithmetic may differ in the last bit
            diff = np.abs(got[k].astype(int) - ref[k].astype(int))
            assert diff.max() <= 1, (bs, k)


def test_caption_file(model_dir: Path, tmp_path: Path) -> None:
    captions = tmp_path / "captions.txt"
    captions.write_text(f"{CAPTIONS[0]}\n\n  {CAPTIONS[1]}  \n", encoding="utf-8")
    assert sample(model_dir, tmp_path / "file", "--caption_file", str(captions), captions=[]) == 0
    assert sample(model_dir, tmp_path / "flags") == 0
    from_file, from_flags = read_pngs(tmp_path / "file"), read_pngs(tmp_path / "flags")
    assert list(from_file) == EXPECTED_PNGS
    assert all(np.array_equal(from_file[k], from_flags[k]) for k in from_flags)
    assert json.loads((tmp_path / "file" / "settings.json").read_text())["captions"][2] == CAPTIONS[1]


def test_sample_profile_prints_stage_table(model_dir: Path, tmp_path: Path, capsys) -> None:
    assert sample(model_dir, tmp_path / "p", "--profile", "--jacobi", "0", captions=CAPTIONS[:1]) == 0
    out = capsys.readouterr().out
    assert re.search(r"stage\s+seconds\s+share", out)
    for stage in ("text encoding", "denoising", "VAE decoding"):
        assert re.search(rf"^{stage}\s+\d+\.\d{{3}}\s+\d+\.\d%$", out, re.MULTILINE), stage
    blocks = re.findall(r"^flow block (\d) \((deep|shallow)\)\s+\d+\.\d{3}\s+\d+\.\d%\s+(\d+)$", out, re.MULTILINE)
    assert [b[:2] for b in blocks] == [("2", "deep"), ("1", "shallow"), ("0", "shallow")]
    # sequential decoding: one evaluation per token of every block (3 blocks of 16 tokens)
    assert [int(b[2]) for b in blocks] == [16, 16, 16]


def test_sample_without_prompt_is_a_clear_error(model_dir: Path, tmp_path: Path, capsys) -> None:
    assert sample(model_dir, tmp_path / "none", captions=[]) == 2
    assert "error: no prompt: pass --caption" in capsys.readouterr().err


def test_unconditional_models_sample_without_a_prompt_and_refuse_one(tiny_config, tmp_path: Path, capsys) -> None:
    """A ``txt_size 0`` model takes no prompt: ``sample`` and ``generate-set`` make ``--num_samples`` samples, and a
    caption (which it could only ignore) is refused."""
    from starflow.adapters import build_latent_adapter
    from starflow.models import STARFlow

    cfg = load_config(dict(tiny_config, txt_size=0, text=None, drop_label=0.0))  # (cond_top_only 1 left: unused)
    torch.manual_seed(0)
    model = STARFlow.from_config(cfg, txt_dim=None, vae_downsample=1)
    Pipeline(model, None, build_latent_adapter(None, channels=cfg.channel_size), cfg).save_pretrained(tmp_path / "m")
    common = ["--checkpoint_path", str(tmp_path / "m"), "--jacobi", "0"]
    assert main(["sample", *common, "--num_samples", "3", "--output_dir", str(tmp_path / "s")]) == 0
    assert len(list((tmp_path / "s").glob("0000*.png"))) == 3
    assert main(["generate-set", *common, "--num_samples", "2", "--out", str(tmp_path / "set")]) == 0
    assert sorted(p.name for p in (tmp_path / "set").glob("*.png")) == ["000000.png", "000001.png"]
    capsys.readouterr()
    assert main(["evaluate", "--samples", str(tmp_path / "set"), "--metrics", "clip", "--clip_model", "x"]) == 2
    assert "clip compares images with their captions, and the samples in" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["sample", *common, "--caption", "a cat", "--output_dir", str(tmp_path / "s2")]) == 2
    assert "--caption: this model is unconditional (txt_size 0) and takes no prompt" in capsys.readouterr().err
    assert main(["generate-set", *common, "--caption", "a", "--num_samples", "2", "--out", str(tmp_path / "set2")]) == 2
    assert "--caption: this model is unconditional (txt_size 0)" in capsys.readouterr().err
    assert main(["generate-set", "--checkpoint_path", str(DEMO_DIR), "--num_samples", "2",
                 "--out", str(tmp_path / "set3")]) == 2  # a text model without captions
    assert "no captions: pass --caption TEXT" in capsys.readouterr().err
    image = tmp_path / "in.png"
    Image.fromarray(np.full((8, 8), 200, dtype=np.uint8)).save(image)
    inpaint = ["inpaint", "--input_image", str(image), "--mask_box", "0,4,8,8"]
    assert main([*inpaint, *common, "--output_dir", str(tmp_path / "inp")]) == 0
    assert (tmp_path / "inp" / "result.png").is_file()
    capsys.readouterr()
    assert main([*inpaint, *common, "--caption", "x", "--output_dir", str(tmp_path / "inp2")]) == 2
    assert "--caption: this model is unconditional" in capsys.readouterr().err
    assert main(["edit", "--input_image", str(image), "--source_caption", "a", "--caption", "b", *common]) == 2
    assert "is unconditional (txt_size 0): use inpaint" in capsys.readouterr().err
    assert main([*inpaint, "--checkpoint_path", str(DEMO_DIR), "--output_dir", str(tmp_path / "inp3")]) == 2
    assert "inpaint needs --caption" in capsys.readouterr().err


def test_sample_missing_checkpoint_returns_2(tmp_path: Path, capsys) -> None:
    code = main(["sample", "--checkpoint_path", str(tmp_path / "nope.safetensors"), "--caption", "x",
                 "--model_config_path", str(tmp_path / "nope.yaml"), "--output_dir", str(tmp_path / "o")])
    assert code == 2 and "not found" in capsys.readouterr().err


# ---------------------------------------------------------------------- eval-nll
def test_eval_nll_command(model_dir: Path, digits, capsys) -> None:
    assert main(["eval-nll", "--checkpoint_path", str(model_dir), "--data", str(digits["test"]),
                 "--batch_size", "16", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "images: 24 x 1 noise draws" in out
    nats, bits, ci = map(float, re.search(r"([-\d.]+) nats/dim = ([-\d.]+) ± ([\d.]+) bits/dim", out).groups())
    assert 0 < ci < 1
    pixel = float(re.search(r"bits/dim on the 8-bit pixel scale: ([-\d.]+)", out).group(1))
    assert bits == pytest.approx(nats / math.log(2), abs=2e-4)
    assert pixel == pytest.approx(bits + math.log2(127.5), abs=2e-4)
    pipe = Pipeline.from_pretrained(model_dir)
    r = evaluate_nll(pipe, str(digits["test"]), batch_size=16, progress=False)
    assert f"= {r.bits_per_dim:.4f} ± {r.bits_per_dim_ci95:.4f} bits/dim" in out  # evaluate_nll's numbers
    assert f"checkpoint: {model_dir}" in out and "(seed 0)" in out
    assert main(["eval-nll", "--checkpoint_path", str(model_dir), "--data", str(digits["test"]), "--num_samples", "1",
                 "--device", "cpu"]) == 0
    assert "bits/dim (one image: no interval over images;" in capsys.readouterr().out
    out_file = model_dir.parent / "nll.json"  # --out: the same numbers, and what they were measured with
    assert main(["eval-nll", "--checkpoint_path", str(model_dir), "--data", str(digits["test"]), "--batch_size", "16",
                 "--device", "cpu", "--seed", "3", "--out", str(out_file)]) == 0
    record = json.loads(out_file.read_text())
    again = evaluate_nll(pipe, str(digits["test"]), batch_size=16, seed=3, progress=False)
    assert record["bits_per_dim"] == again.bits_per_dim and record["pixel_bits_per_dim"] == again.pixel_bits_per_dim
    assert record["seed"] == 3 and record["images"] == 24 and record["checkpoint"] == str(model_dir.resolve())
    assert record["resized"] == 0 and "resized" not in capsys.readouterr().out
    # images of another size are resized to the model's: said, and counted, as their bits/dim are not the files'
    big = model_dir.parent / "big"
    shutil.copytree(digits["test"], big)
    records = [json.loads(line) for line in (big / "metadata.jsonl").read_text().splitlines()]
    for r in records[:3]:
        with Image.open(big / r["file_name"]) as img:
            img.resize((32, 32)).save(big / r["file_name"])
    assert main(["eval-nll", "--checkpoint_path", str(model_dir), "--data", str(big), "--num_samples", "100",
                 "--device", "cpu", "--out", str(out_file)]) == 0
    out = capsys.readouterr().out
    assert "note: 3 of the 24 images are not 8x8 pixels, the model's size: each was resized" in out
    assert "note: --num_samples 100: " in out and json.loads(out_file.read_text())["resized"] == 3
    # an unreadable or missing image is refused by name (never replaced by another, as training does), unwarned
    (big / records[5]["file_name"]).write_bytes(b"not an image")
    args = ["eval-nll", "--checkpoint_path", str(model_dir), "--data", str(big), "--device", "cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"error: cannot read image {big / records[5]['file_name']}" in err and "over every listed image" in err
    assert "skipping" not in err
    (big / records[5]["file_name"]).unlink()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "1 file(s) listed in" in err and "are missing" in err and "skipping" not in err


def test_evaluate_nll_matches_the_model_likelihood(model_dir: Path, digits) -> None:
    pipe = Pipeline.from_pretrained(model_dir)
    r = evaluate_nll(pipe, str(digits["test"]), batch_size=64, noise_samples=1, seed=3, progress=False)
    assert r.images == 24
    assert all(math.isfinite(v) for v in (r.nats_per_dim, r.bits_per_dim, r.pixel_bits_per_dim))
    assert r.bits_per_dim == pytest.approx(r.nats_per_dim / math.log(2), rel=1e-12)
    assert r.pixel_bits_per_dim == pytest.approx(r.bits_per_dim + math.log2(127.5), rel=1e-12)
    assert PIXEL_SCALE_BITS == pytest.approx(math.log2(127.5))
    # by hand: the same noise draw, the flow's per-dimension NLL plus the Gaussian constant
    cfg = pipe.config
    data = ImageFolder(digits["test"], cfg.img_size, cfg.channel_size, multiple=cfg.patch_size)
    batch = collate([data[i] for i in range(len(data))])
    noise = torch.stack([torch.randn(batch["pixels"].shape[1:], generator=torch.Generator().manual_seed(
        sample_seed(3, i, 0))) for i in range(len(data))])  # image i's draw: sample_seed(seed, i, draw)
    x = batch["pixels"] + cfg.noise_std * noise
    with torch.no_grad():
        nll = pipe.model.nll(x, pipe.encode_prompts(batch["text"])).double()  # (B,)
    assert r.nats_per_dim == pytest.approx(nll.mean().item() + HALF_LOG_2PI, rel=1e-5)
    ci = 1.96 * nll.std().item() / math.sqrt(len(nll)) / math.log(2)  # the 95% interval over images
    assert r.bits_per_dim_ci95 == pytest.approx(ci, rel=1e-4)
    first = evaluate_nll(pipe, str(digits["test"]), batch_size=5, seed=3, progress=False, num_samples=10)
    assert first.images == 10 and first.nats_per_dim == pytest.approx(nll[:10].mean().item() + HALF_LOG_2PI, rel=1e-5)
    more = evaluate_nll(pipe, str(digits["test"]), batch_size=7, noise_samples=3, seed=3, progress=False)
    assert more.images == 24 and abs(more.bits_per_dim - r.bits_per_dim) < 0.1  # more draws, same estimate


def test_evaluate_nll_of_a_uniform_dequantisation_model(model_dir: Path, digits) -> None:
    """``noise_type: uniform``: the likelihood is of the 8-bit pixels dequantised as in training, ``((x + 1) 127.5 +
    u) / 256 * 2 - 1`` with ``u ~ U[0, 1)``, and the 8-bit figure adds log2(128) = 7."""
    import dataclasses

    pipe = Pipeline.from_pretrained(model_dir)
    pipe.config = dataclasses.replace(pipe.config, noise_type="uniform", vae=None)
    r = evaluate_nll(pipe, str(digits["test"]), batch_size=64, seed=3, progress=False)
    data = ImageFolder(digits["test"], pipe.config.img_size, pipe.config.channel_size, multiple=pipe.config.patch_size)
    batch = collate([data[i] for i in range(len(data))])
    u = torch.stack([torch.rand(batch["pixels"].shape[1:], generator=torch.Generator().manual_seed(
        sample_seed(3, i, 0))) for i in range(len(data))])
    x = ((batch["pixels"] + 1) * 127.5 + u) / 256 * 2 - 1
    assert (x - batch["pixels"]).abs().max() <= 1 / 128  # within its 8-bit bin
    with torch.no_grad():
        nll = pipe.model.nll(x, pipe.encode_prompts(batch["text"])).double()
    assert r.nats_per_dim == pytest.approx(nll.mean().item() + HALF_LOG_2PI, rel=1e-5)
    assert r.pixel_bits_per_dim == pytest.approx(r.bits_per_dim + 7.0, rel=1e-12)


# ---------------------------------------------------------------------- model folders
def test_save_pretrained_round_trip(make_pipeline, tmp_path: Path) -> None:
    pipe = make_pipeline(cfg=1.5)
    assert pipe.config.text == "tiny-t5"
    folder = tmp_path / "model"
    pipe.save_pretrained(folder)
    assert (folder / "model.safetensors").is_file() and (folder / "config.yaml").is_file()
    assert (folder / "text_encoder" / "config.json").is_file()
    assert load_config(folder / "config.yaml").text == "text_encoder"

    loaded = Pipeline.from_pretrained(folder)
    assert loaded.text_encoder is not None and loaded.config.text == "text_encoder"
    for k, v in pipe.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    prompts = ["a handwritten digit 1", "a handwritten digit 7", ""]
    torch.testing.assert_close(loaded.encode_prompts(prompts), pipe.encode_prompts(prompts), rtol=0, atol=0)
    settings = SampleSettings(cfg=1.5)
    a = pipe(prompts, settings, seeds=[0, 1, 2])
    b = loaded(prompts, settings, seeds=[0, 1, 2])
    assert torch.equal(a, b)


def test_a_killed_save_leaves_no_folder_that_loads_another_runs_config(make_pipeline, tmp_path: Path,
                                                                        monkeypatch) -> None:
    """An export over an earlier one that dies while it writes (here: its config, in its scratch folder) leaves the
    earlier export as it was; one that dies while it moves its files in (here: the config, last) leaves a folder that
    refuses to load, not the new weights under the old config; a config is never half-written."""
    import starflow.files
    import starflow.sampling.pipeline as pipeline_module

    folder = tmp_path / "model"
    make_pipeline(cfg=1.5).save_pretrained(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    replace = starflow.files.os.replace
    for dying_at, earlier_kept in ((folder / "config.yaml", False), (None, True)):
        def killed(src, dst):
            if Path(dst).name == "config.yaml" and (dying_at is None or Path(dst) == dying_at):
                raise KeyboardInterrupt  # the process dies here
            replace(src, dst)

        monkeypatch.setattr(starflow.files.os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            make_pipeline(cfg=3.0, seed=1).save_pretrained(folder)
        monkeypatch.undo()
        assert not list(folder.glob(".*.tmp*"))
        if earlier_kept:
            assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
            assert pipeline_module.Pipeline.from_pretrained(folder).config.cfg == 1.5
        else:
            assert not (folder / "config.yaml").exists()
            with pytest.raises(FileNotFoundError):
                pipeline_module.Pipeline.from_pretrained(folder)
            make_pipeline(cfg=1.5).save_pretrained(folder)  # the earlier export again, for the next case


def test_an_absolute_asset_path_from_another_machine_is_found_by_its_name_beside_the_folder(tmp_path: Path) -> None:
    from starflow.assets import resolve_asset

    (tmp_path / "model" / "my_vae").mkdir(parents=True)
    with pytest.warns(UserWarning, match=f"/elsewhere/configs/my_vae is not on this machine; using {tmp_path}"):
        assert resolve_asset("/elsewhere/configs/my_vae:0.6", tmp_path / "model") == \
            f"{tmp_path / 'model' / 'my_vae'}:0.6"
    assert resolve_asset(str(tmp_path / "model" / "my_vae"), tmp_path) == str(tmp_path / "model" / "my_vae")
    assert resolve_asset("/elsewhere/configs/other_vae", tmp_path / "model") == "/elsewhere/configs/other_vae"
    (tmp_path / "model" / "stabilityai" / "sd-vae-ft-ema").mkdir(parents=True)  # as starflow download lays it out
    with pytest.warns(UserWarning, match="stabilityai/sd-vae-ft-ema is not on this machine"):
        assert resolve_asset("/home/alice/repo/ckpts/stabilityai/sd-vae-ft-ema", tmp_path / "model") == \
            str(tmp_path / "model" / "stabilityai" / "sd-vae-ft-ema")


def test_loaded_model_folder_can_be_saved_again(model_dir: Path, tmp_path: Path) -> None:
    pipe = Pipeline.from_pretrained(model_dir)
    pipe.save_pretrained(tmp_path / "copy")
    again = Pipeline.from_pretrained(tmp_path / "copy")
    settings = SampleSettings(cfg=1.5)
    assert torch.equal(pipe(CAPTIONS, settings, seeds=[5, 6]), again(CAPTIONS, settings, seeds=[5, 6]))


# ---------------------------------------------------------------------- help
@pytest.mark.parametrize("command", [[], ["train"], ["sample"], ["eval-nll"]])
def test_help_exits_0(command: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(command + ["--help"])
    assert exc.value.code == 0
    out = normalised(capsys.readouterr().out)
    assert "usage: starflow" in out
    if not command:
        assert all(name in out for name in ("train", "sample", "eval-nll"))


@pytest.mark.parametrize("command", ["train", "sample"])
def test_help_documents_config_keys(command: str, capsys) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = normalised(capsys.readouterr().out)
    assert "--noise_std V std of the Gaussian noise added to training latents (normalised-latent units) " \
           "[default: 0.3]" in out
    assert "--layers_per_block" in out and "CLI > YAML > defaults" in out
    assert "(last = deep block) [default: 8]" in out  # the value Config fills in, not the field's None
    assert "'R2L' = block 0 reads tokens in raster order" in out
    assert ("--data V" in out) == (command == "train")  # sampling takes no training data


@pytest.mark.parametrize("command", ["sample", "inpaint", "edit", "generate-set"])
def test_decoding_help_is_the_commands_own(command: str, capsys) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = normalised(capsys.readouterr().out)
    assert ("'random': each sample draws" in out) == (command in ("sample", "generate-set"))  # inpaint/edit refuse it
    assert ("images per process of a single prompt" in out) == (command == "sample")


# ---------------------------------------------------------------------- the shipped demo
def test_sample_without_checkpoint_needs_the_demo(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setattr(assets, "DEMO_DIR", tmp_path / "no_demo")
    assert main(["sample", "--output_dir", str(tmp_path / "o"), "--device", "cpu"]) == 2
    assert f"the shipped demo ({tmp_path / 'no_demo'}) is not there" in capsys.readouterr().err


@pytest.mark.skipif(not (DEMO_DIR / "config.yaml").is_file(),
                    reason=f"the shipped demo {DEMO_DIR} is not in this checkout yet")
def test_sample_from_the_shipped_demo(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["sample", "--output_dir", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "sampling from the shipped demo" in printed
    pngs = sorted(p.name for p in out.glob("0*.png"))
    assert len(pngs) == len(DEMO_PROMPTS) == 10
    assert pngs[3] == "00003_a_handwritten_digit_3.png"
    assert (out / "grid.png").is_file() and (out / "settings.json").is_file()
    assert "earlier run" not in printed
    assert main(["sample", "--output_dir", str(out), "--device", "cpu", "--caption", "a handwritten digit 5",
                 "--num_samples", "2"]) == 0  # the same folder again: the 10 demo images stay, and it says so
    printed = capsys.readouterr().out
    assert f"note: {out} also holds 10 file(s) of an earlier run, left as they were: 00000_a_handwritten_digit_0.png" \
        in printed
    # a sample's extra files from an earlier run (its block-by-block sequence) are named too, though its stem is reused
    assert main(["sample", "--output_dir", str(out), "--device", "cpu", "--caption", "a handwritten digit 5",
                 "--num_samples", "1", "--return_sequence"]) == 0
    capsys.readouterr()
    assert main(["sample", "--output_dir", str(out), "--device", "cpu", "--caption", "a handwritten digit 5",
                 "--num_samples", "1", "--seed", "3"]) == 0
    assert "00000_a_handwritten_digit_5_sequence.png" in capsys.readouterr().out


def test_weights_file_elsewhere_resolves_assets_beside_config(model_dir: Path, tmp_path: Path) -> None:
    """--checkpoint_path to a weights file in another folder + --model_config_path: the config's relative
    `text: text_encoder` resolves against the config's folder, not the weights' folder."""
    weights = tmp_path / "elsewhere" / "weights.safetensors"
    weights.parent.mkdir()
    weights.write_bytes((model_dir / "model.safetensors").read_bytes())
    out = tmp_path / "out"
    assert main(["sample", "--checkpoint_path", str(weights), "--model_config_path", str(model_dir / "config.yaml"),
                 "--caption", "a handwritten digit 1", "--output_dir", str(out)]) == 0
    assert (out / "00000_a_handwritten_digit_1.png").is_file()


def test_corrupt_weights_give_a_clear_cli_error(model_dir: Path, tmp_path: Path, capsys) -> None:
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes((model_dir / "model.safetensors").read_bytes()[:5000])
    code = main(["sample", "--checkpoint_path", str(broken), "--model_config_path", str(model_dir / "config.yaml"),
                 "--caption", "x", "--output_dir", str(tmp_path / "out")])
    assert code == 2
    assert "corrupt or incomplete" in capsys.readouterr().err


def test_negative_prompts_replace_the_unconditional_rows(tmp_path: Path, capsys) -> None:
    pipe = Pipeline.from_pretrained(DEMO_DIR)
    settings, prompts = SampleSettings(cfg=2.0, jacobi=False), ["a handwritten digit 8"] * 2
    plain = pipe(prompts, settings, seeds=[0, 1])
    assert torch.equal(pipe(prompts, settings, seeds=[0, 1], negative_prompts=["", ""]), plain)  # default unchanged
    negative = pipe(prompts, settings, seeds=[0, 1], negative_prompts=["a handwritten digit 3"] * 2)
    assert (negative - plain).abs().max() > 0.1
    with pytest.raises(ValueError, match="one per prompt"):
        pipe(prompts, settings, negative_prompts=["x"])
    (tmp_path / "captions.txt").write_text("a handwritten digit 8\ta handwritten digit 3\na handwritten digit 8\n")
    base = ["sample", "--checkpoint_path", str(DEMO_DIR), "--cfg", "2.0", "--jacobi", "0", "--device", "cpu"]
    assert main(base + ["--caption_file", str(tmp_path / "captions.txt"), "--output_dir", str(tmp_path / "f")]) == 0
    record = json.loads((tmp_path / "f" / "settings.json").read_text())
    assert record["captions"] == prompts and record["negative_prompts"] == ["a handwritten digit 3", ""]
    assert main(base + ["--caption", "a handwritten digit 8", "--num_samples", "1", "--negative_prompt",
                        "a handwritten digit 3", "--output_dir", str(tmp_path / "c")]) == 0
    file_png = np.asarray(Image.open(tmp_path / "f" / "00000_a_handwritten_digit_8.png"))
    flag_png = np.asarray(Image.open(tmp_path / "c" / "00000_a_handwritten_digit_8.png"))
    np.testing.assert_array_equal(file_png, flag_png)
    capsys.readouterr()
    assert main(base[:3] + ["--cfg", "0", "--caption", "x", "--negative_prompt", "y", "--output_dir",
                            str(tmp_path / "z"), "--device", "cpu"]) == 2
    assert "act through classifier-free guidance, which is off" in capsys.readouterr().err


def test_a_broken_pipe_is_silent_only_when_it_is_stdout(tmp_path) -> None:
    """``starflow validate ... | head`` ends quietly (exit 141) when the reader goes away; a BrokenPipeError from
    another pipe (a DataLoader worker's) is an error line like any other, not a silent 141."""
    import os
    import subprocess
    import sys

    from starflow.assets import DEMO_DIR

    env = dict(os.environ, OMP_NUM_THREADS="1")
    config = str(DEMO_DIR / "config.yaml")
    reader_gone = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1); from starflow.cli import main; "
                                    f"raise SystemExit(main(['validate', {config!r}]))"], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, env=env)
    reader_gone.stdout.close()
    assert reader_gone.wait(timeout=120) == 141 and reader_gone.stderr.read() == b""
    other = ("import starflow.cli.checkpoints as c\n"
             "def validate(args):\n    raise BrokenPipeError(32, 'Broken pipe')\n"
             "c.validate = validate\nfrom starflow.cli import main\n"
             f"raise SystemExit(main(['validate', {config!r}]))")
    r = subprocess.run([sys.executable, "-c", other], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "error: [Errno 32] Broken pipe", r.stderr


def test_package_log_records_are_warning_lines_during_a_command_only(tmp_path, capsys, caplog) -> None:
    """During a command the package's log records are ``warning: ...`` lines on stderr, and only that (not also
    through a root handler: a notebook's, here pytest's); afterwards the logging setup is as it was."""
    import logging

    from PIL import Image

    from starflow.console import showing_log_lines

    src = tmp_path / "src"
    src.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("L", (8, 8), 128).save(src / name)
    (src / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n')
    with caplog.at_level(logging.WARNING):
        assert main(["pack", str(src), str(tmp_path / "shards")]) == 0
    assert f"warning: {src}: 1 image file(s) under it not listed in its metadata.jsonl" in capsys.readouterr().err
    assert "not listed" not in caplog.text  # (shown once)
    assert not showing_log_lines() and logging.getLogger("starflow").propagate
    with caplog.at_level(logging.WARNING):
        logging.getLogger("starflow.data.images").warning("after the command")
    assert "after the command" in caplog.text and "after the command" not in capsys.readouterr().err


def test_sampling_seed_does_not_redraw_the_tiny_text_encoder(tmp_path: Path) -> None:
    """``text: tiny-t5`` is drawn from the config's seed: ``--seed`` picks the samples' noise, not another encoder
    (the weights file with the demo's YAML gives the model folder's samples, whatever the seed)."""
    common = ["--caption", "a handwritten digit 7", "--seed", "5", "--num_samples", "1", "--device", "cpu"]
    assert main(["sample", "--checkpoint_path", str(DEMO_DIR), *common, "--output_dir", str(tmp_path / "folder")]) == 0
    assert main(["sample", "--checkpoint_path", str(DEMO_DIR / "model.safetensors"), "--model_config_path",
                 str(DEMO_DIR.parents[1] / "configs" / "demo_digits.yaml"), *common, "--output_dir", str(tmp_path / "file")]) == 0
    made = sorted(p.name for p in (tmp_path / "folder").glob("*.png") if p.name != "grid.png")
    assert made and all((tmp_path / "folder" / n).read_bytes() == (tmp_path / "file" / n).read_bytes() for n in made)


def test_an_image_model_with_a_learnable_denoiser_says_it_is_not_used(model_dir: Path, digits, tmp_path,
                                                                      capsys) -> None:
    """Images denoise with the Tweedie step (SPEC section 10): training an image config's learnable denoiser is said
    to be unused by sampling, and --disable_learnable_denoiser, which could change nothing, is refused."""
    text = (model_dir / "config.yaml").read_text()
    assert "learnable_self_denoiser: false" in text
    shutil.copytree(model_dir, tmp_path / "model")  # (its text encoder beside it)
    config = tmp_path / "model" / "config.yaml"  # (the check reads the config alone, before the weights load)
    config.write_text(text.replace("learnable_self_denoiser: false", "learnable_self_denoiser: true"))
    assert main(["sample", "--checkpoint_path", str(model_dir / "model.safetensors"), "--model_config_path",
                 str(config), "--caption", "x", "--disable_learnable_denoiser", "--output_dir", str(tmp_path / "out"),
                 "--device", "cpu"]) == 2
    assert "--disable_learnable_denoiser: images always denoise with the Tweedie step" in capsys.readouterr().err
    assert main(["train", "--config", str(config), "--data", str(digits["train"]), "--logdir",
                 str(tmp_path / "run"), "--device", "cpu", "--ema", "0.9", "--ema_start", "100", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "note: learnable_self_denoiser trains a denoiser that image sampling does not use" in out
    assert "note: ema_start 100 >= steps 4: the moving average never starts" in out
