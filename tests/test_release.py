"""The released-checkpoint path: validate, download, convert, the official YAMLs with every command."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from starflow.checkpoint import CheckpointError, read_shapes, save_weights
from starflow.cli import main
from starflow.config import load_config
from starflow.download import DownloadError, RELEASES, _check_sizes, download, release_assets

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("STARFLOW_REFERENCE_DIR", ROOT.parent / "shared" / "reference"))
OFFICIAL = {
    "t2i": ("starflow_3B_t2i_256x256.yaml", "keys_starflow_3B_t2i_256x256.json", 3_858_281_544, 0),
    "t2v": ("starflow-v_7B_t2v_caus_480p.yaml", "keys_starflow-v_7B_t2v_caus_480p.json", 6_890_096_528, 912_884_784),
}


def shape_only_checkpoint(keys: dict, path: Path) -> Path:
    """A ``torch.save`` file with every official name and shape but no data (meta tensors): what
    ``validate --checkpoint`` reads from the real 14-28 GB files, at 40 kB."""
    torch.save({k: torch.empty(shape, device="meta") for k, shape in keys.items()}, path)
    return path


def official_keys(name: str) -> dict:
    if not (REFERENCE / name).is_file():
        pytest.skip(f"reference file {REFERENCE / name} not found (set STARFLOW_REFERENCE_DIR)")
    d = json.loads((REFERENCE / name).read_text())
    return {**d["parameters"], **d["deprecated_buffers"]}


# ---------------------------------------------------------------------- validate
@pytest.mark.parametrize("release", ["t2i", "t2v"])
def test_validate_official_config_counts_and_layout(release: str, tmp_path: Path, capsys) -> None:
    yaml_name, keys_name, total, denoiser = OFFICIAL[release]
    keys = official_keys(keys_name)
    ckpt = shape_only_checkpoint(keys, tmp_path / "official.pth")
    assert main(["validate", str(ROOT / "configs" / yaml_name), "--checkpoint", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert f"{total:,}" in out
    assert "every name and shape matches" in out
    if denoiser:
        assert f"learnable_self_denoiser   denoiser        8   3072   yes{denoiser:>16,}" in out
    # the per-block rows add up to the total
    rows = [line for line in out.splitlines() if line.startswith(("blocks.", "learnable_self_denoiser"))]
    assert sum(int(line.split()[-1].replace(",", "")) for line in rows) == total
    assert "KV cache" in out and "checkpointed" in out and "bf16" in out


def test_validate_reports_every_mismatch_at_once(tmp_path: Path, capsys) -> None:
    keys = official_keys(OFFICIAL["t2i"][1])
    keys.pop("blocks.5.attn_blocks.3.mlp.main.0.weight")
    keys["blocks.5.extra.weight"] = [3]
    keys["blocks.0.proj_in.weight"] = [3072, 8]
    keys["blocks.2.proj_out.bias"] = [16]
    ckpt = shape_only_checkpoint(keys, tmp_path / "bad.pth")
    assert main(["validate", str(ROOT / "configs" / OFFICIAL["t2i"][0]), "--checkpoint", str(ckpt)]) == 1
    out = capsys.readouterr().out
    for name in ("blocks.5.attn_blocks.3.mlp.main.0.weight", "blocks.5.extra.weight", "blocks.0.proj_in.weight",
                 "blocks.2.proj_out.bias"):
        assert name in out


def test_validate_truncated_checkpoint_is_a_clear_error(tiny_config, tmp_path: Path, capsys, config_file) -> None:
    from starflow.models import STARFlow

    cfg = config_file(tiny_config)
    model = STARFlow.from_config(load_config(cfg), txt_dim=32, vae_downsample=1)
    for suffix in (".pth", ".safetensors"):
        path = save_weights(model, tmp_path / f"w{suffix}")
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        assert main(["validate", str(cfg), "--checkpoint", str(path)]) == 2
        err = capsys.readouterr().err
        assert "corrupt or incomplete" in err and str(path) in err


def test_validate_tiny_checkpoint_round_trip(tiny_config, tmp_path: Path, config_file, capsys) -> None:
    from starflow.models import STARFlow

    cfg = config_file(tiny_config)
    model = STARFlow.from_config(load_config(cfg), txt_dim=32, vae_downsample=1)
    path = save_weights(model, tmp_path / "w.safetensors")
    assert main(["validate", str(cfg), "--checkpoint", str(path)]) == 0
    assert f"{sum(p.numel() for p in model.parameters()):,} parameters)" in capsys.readouterr().out


def test_kv_cache_estimate_equals_what_sampling_allocates(tiny_config) -> None:
    from starflow.models import STARFlow
    from starflow.sizing import size_report

    cfg = load_config(dict(tiny_config, cfg=2.0))
    report = size_report(cfg, txt_dim=32, batch=3)
    model = STARFlow.from_config(cfg, txt_dim=32, vae_downsample=1)
    tokens = (cfg.img_size // cfg.patch_size) ** 2
    allocated = 0
    for block in model.blocks:
        rows = 3 * (2 if block.text_conditioned else 1)
        cache = block.new_cache(rows, tokens + (cfg.txt_size if block.text_conditioned else 0), torch.float32, "cpu")
        allocated = max(allocated, cache.k.numel() * 4 + cache.v.numel() * 4)
    assert report.memory[0].dtype == "fp32" and report.memory[0].kv_cache == allocated
    assert report.memory[1].kv_cache * 2 == allocated
    assert report.total_parameters == sum(p.numel() for p in model.parameters())


def test_training_state_is_divided_over_the_ranks_only_when_sharded(tiny_config) -> None:
    from starflow.sizing import size_report

    one, fsdp, ddp = (size_report(load_config(dict(tiny_config, fsdp=f)), txt_dim=32, gpus=g)
                      for f, g in ((1, 1), (1, 4), (0, 4)))
    a, f, d = one.memory[0], fsdp.memory[0], ddp.memory[0]
    assert f.weights == a.weights // 4 and f.training_state == a.training_state // 4
    assert d.weights == a.weights and d.training_state == a.training_state  # DDP: every rank holds them whole


def test_validate_rejects_a_wrong_config_key(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("arguments:\n- img_sise: 256\n")
    assert main(["validate", str(bad)]) == 2
    assert "img_size" in capsys.readouterr().err


# ---------------------------------------------------------------------- download
@pytest.mark.parametrize("release", ["t2i", "t2v", "all"])
def test_download_offline_lists_files_and_destinations(release: str, tmp_path: Path, capsys) -> None:
    assert main(["download", release, "--local-dir", str(tmp_path / "ck")]) == 2  # HF_HUB_OFFLINE=1 in tests
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE" in err
    for asset in release_assets(release):
        assert asset.what in err
        for p in asset.patterns:
            assert p in err
    if release in ("t2i", "all"):
        assert f"apple/starflow/resolve/main/starflow_3B_t2i_256x256.pth -> {tmp_path / 'ck'}/starflow_3B_t2i_256x256.pth" in err
    if release in ("t2v", "all"):
        assert "Wan2.2-TI2V-5B-Diffusers/vae/diffusion_pytorch_model.safetensors" in err
    assert len(release_assets("all")) == 5  # the T5 is shared


def test_download_offline_with_files_in_place(tmp_path: Path, capsys) -> None:
    for asset in RELEASES["t2v"]:
        root = asset.target(tmp_path)
        for p in asset.patterns:
            (root / p.replace("*", "model")).parent.mkdir(parents=True, exist_ok=True)
            (root / p.replace("*", "model")).write_bytes(b"x")
    assert len(download("t2v", tmp_path)) == 3
    assert main(["download", "t2v", "--local-dir", str(tmp_path)]) == 0
    hint = capsys.readouterr().out.splitlines()[-1]  # the video script, pointed at the downloaded checkpoint
    assert hint == (f"sample with e.g.: CKPT={tmp_path / 'starflow-v_7B_t2v_caus_480p_v3.pth'} bash "
                    'scripts/sample_video.sh "a corgi running on the beach"')
    assert main(["download", "t2i", "--local-dir", str(tmp_path / "starflow-v_7B_t2v_caus_480p_v3.pth")]) == 2
    assert "is a file; pass a folder" in capsys.readouterr().err
    vae = RELEASES["t2v"][2].target(tmp_path) / "vae" / "diffusion_pytorch_model.safetensors"
    vae.write_bytes(b"")  # a copy that never got its bytes is not a file in place
    assert main(["download", "t2v", "--local-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "WAN2.2 VAE" in err and "T5 text encoder" not in err and f"empty now (0 bytes): {vae}" in err
    vae.write_bytes(b"x")
    shard = RELEASES["t2v"][1].target(tmp_path) / "model-00002-of-00002.safetensors"
    shard.write_bytes(b"")  # an empty second shard beside a full first one (a pattern, *.safetensors)
    assert main(["download", "t2v", "--local-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "T5 text encoder" in err and "WAN2.2 VAE" not in err and f"empty now (0 bytes): {shard}" in err
    with pytest.raises(ValueError, match="unknown release"):
        release_assets("t2x")


def test_size_check_names_the_incomplete_file(tmp_path: Path) -> None:
    from huggingface_hub.file_download import DryRunFileInfo

    (tmp_path / "a.pth").write_bytes(b"12345")
    info = DryRunFileInfo(commit_hash="0", file_size=10, filename="a.pth", local_path=str(tmp_path / "a.pth"),
                          is_cached=False, will_download=True)
    with pytest.raises(DownloadError, match="a.pth: 5 bytes, expected 10"):
        _check_sizes([info], tmp_path, RELEASES["t2i"][0])
    _check_sizes([DryRunFileInfo("0", 5, "a.pth", "", False, False)], tmp_path, RELEASES["t2i"][0])


# ---------------------------------------------------------------------- convert
def test_convert_keeps_names_and_casts(tiny_config, tmp_path: Path, capsys) -> None:
    from starflow.checkpoint import read_state_dict
    from starflow.models import STARFlow

    model = STARFlow.from_config(load_config(dict(tiny_config)), txt_dim=32, vae_downsample=1)
    src = save_weights(model, tmp_path / "w.pth")
    st = tmp_path / "w.safetensors"
    assert main(["convert", str(src), str(st)]) == 0
    assert read_shapes(st) == read_shapes(src)
    a, b = read_state_dict(src), read_state_dict(st)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert main(["convert", str(st), str(tmp_path / "half.pth"), "--dtype", "bf16"]) == 0
    half = read_state_dict(tmp_path / "half.pth")
    assert all(v.dtype == torch.bfloat16 for v in half.values()) and half.keys() == a.keys()
    assert main(["convert", str(src), str(st)]) == 2  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err


def test_read_shapes_of_safetensors_reads_only_the_header(tiny_config, tmp_path: Path) -> None:
    from starflow.models import STARFlow

    model = STARFlow.from_config(load_config(dict(tiny_config)), txt_dim=32, vae_downsample=1)
    path = save_weights(model, tmp_path / "w.safetensors")
    header = int.from_bytes(path.read_bytes()[:8], "little")
    data = path.read_bytes()
    damaged = tmp_path / "d.safetensors"  # every tensor byte zeroed: shapes still readable
    damaged.write_bytes(data[: 8 + header] + bytes(len(data) - 8 - header))
    assert read_shapes(damaged) == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError):
        (tmp_path / "t.safetensors").write_bytes(data[:100])
        read_shapes(tmp_path / "t.safetensors")


# ---------------------------------------------------------------------- the official 3B YAML, every command
TINY_MODEL = ["--img_size", "32", "--channels", "32", "--head_dim", "16", "--layers_per_block", "1 2", "--txt_size", "32"]
TINY_OVERRIDES = [*TINY_MODEL, "--batch_size", "4", "--num_workers", "0", "--sample_freq", "0"]  # for training


@pytest.fixture(scope="module")
def official_stand_in(tmp_path_factory, tiny_config, one_thread):
    """A folder laid out like ``starflow download t2i``: a tiny T5 in ``ckpts/google/flan-t5-xl``, a tiny
    8x-downsampling AutoencoderKL in ``ckpts/stabilityai/sd-vae-ft-ema`` and random weights, in the
    official layout, for the official YAML shrunk with CLI overrides."""
    from starflow.adapters import build_tiny_text_encoder
    from starflow.adapters.vae import build_tiny_sd_vae
    from starflow.models import STARFlow

    root = tmp_path_factory.mktemp("official")
    build_tiny_text_encoder(32).save_pretrained(root / "ckpts" / "google" / "flan-t5-xl")
    build_tiny_sd_vae(block_out_channels=(8, 8, 8, 8)).save_pretrained(root / "ckpts" / "stabilityai" / "sd-vae-ft-ema")
    cfg = load_config(ROOT / "configs" / OFFICIAL["t2i"][0],
                      {"img_size": 32, "channels": 32, "head_dim": 16, "layers_per_block": "1 2", "txt_size": 32})
    torch.manual_seed(0)
    model = STARFlow.from_config(cfg, txt_dim=32, vae_downsample=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proj_out.weight" in name or "final_norm.weight" in name:
                p.add_(0.05 * torch.randn_like(p))
    save_weights(model, root / "ckpts" / "starflow_3B_t2i_256x256.pth")
    return root


def test_official_yaml_trains_and_samples_with_local_assets(official_stand_in: Path, digits, monkeypatch, capsys) -> None:
    monkeypatch.chdir(official_stand_in)  # ./ckpts holds the T5 and the VAE under their Hub ids
    yaml_path = str(ROOT / "configs" / OFFICIAL["t2i"][0])
    assert main(["train", "--config", yaml_path, "--dry_run", "--data", str(digits["train"]), "--device", "cpu",
                 "--logdir", "run", *TINY_OVERRIDES]) == 0
    assert "dry run OK" in capsys.readouterr().out
    assert main(["sample", "--checkpoint_path", "ckpts/starflow_3B_t2i_256x256.pth", "--model_config_path", yaml_path,
                 "--caption", "a red apple", "--num_samples", "1", "--output_dir", "out", "--device", "cpu", *TINY_MODEL]) == 0
    img = np.asarray(Image.open("out/00000_a_red_apple.png"))
    assert img.shape == (32, 32, 3) and img.std() > 0


def test_sample_image_script_uses_the_official_checkpoint(official_stand_in: Path, tmp_path: Path) -> None:
    env = dict(os.environ, CKPT=str(official_stand_in / "ckpts" / "starflow_3B_t2i_256x256.pth"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "script_out"
    r = subprocess.run(["bash", str(ROOT / "scripts" / "sample_image.sh"), "a blue car", "--output_dir", str(out),
                        "--device", "cpu", "--jacobi_block_size", "4", *TINY_MODEL],
                       cwd=official_stand_in, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    settings = json.loads((out / "settings.json").read_text())
    assert settings["settings"]["cfg"] == 3.6  # the official script's default guidance
    assert settings["checkpoint"].endswith("starflow_3B_t2i_256x256.pth")
    assert (out / "00000_a_blue_car.png").is_file()


@pytest.mark.parametrize("script, command", [("sample_video.sh", "starflow download t2v"),
                                             ("sample_image.sh", "starflow download t2i")])
def test_sample_scripts_say_how_to_get_the_weights(script: str, command: str, tmp_path: Path) -> None:
    env = dict(os.environ, CKPT=str(tmp_path / "missing.pth"))
    r = subprocess.run(["bash", str(ROOT / "scripts" / script), "a corgi", "--output_dir", str(tmp_path / "out")],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and command in r.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("script, parameters", [("sample_video.sh", "6,890,096,528 flow parameters"),
                                                ("sample_image.sh", "3,858,281,544 flow parameters")])
def test_sample_scripts_dry_run_sizes_the_released_model_before_its_download(script: str, parameters: str,
                                                                              tmp_path: Path) -> None:
    env = dict(os.environ, CKPT=str(tmp_path / "missing.pth"), HF_HUB_OFFLINE="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    r = subprocess.run(["bash", str(ROOT / "scripts" / script), "a corgi", "--dry_run"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "the weights are not there yet" in r.stdout and parameters in r.stdout
    assert not (tmp_path / "outputs").exists()


def test_sample_video_script_passes_flags_that_follow_the_caption(tmp_path: Path) -> None:
    """INPUT_IMAGE and TARGET_LENGTH are optional positionals: a flag right after the caption (or the image) goes to
    starflow sample, not into them."""
    env = dict(os.environ, CKPT=str(ROOT / "ckpts" / "demo_moving_digits" / "model.safetensors"), HF_HUB_OFFLINE="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    script = ["bash", str(ROOT / "scripts" / "sample_video.sh")]
    for extra in (["a digit", "--dry_run"], ["a digit", "none", "--dry_run"], ["a digit", "none", "9", "--dry_run"]):
        r = subprocess.run([*script, *extra], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (extra, r.stderr[-2000:])
        assert "output: outputs/video" in r.stdout
        # one 7B video per caption and process, not sample.py's batch of 16 (~800 GiB of KV cache)
        assert "samples: 1 (1 distinct prompt(s)) over 1 process(es), 1 per process in 1 batch(es) of up to 1" \
            in r.stdout


@pytest.mark.parametrize("refused", [True, False])
def test_download_tells_a_gated_repo_from_an_unreachable_hub(refused: bool, tmp_path: Path, monkeypatch) -> None:
    """``huggingface_hub`` wraps the dry run's errors in a ``DryRunError``: a refused access (gated, 401/403) found
    under it says how to get access; anything else is the offline message."""
    import huggingface_hub
    from huggingface_hub.errors import DryRunError, GatedRepoError

    import starflow.adapters.hub

    gated = GatedRepoError.__new__(GatedRepoError)
    Exception.__init__(gated, "403 Client Error: access to this model is restricted")

    def dry_run(*args, **kwargs):
        try:
            raise gated if refused else ConnectionError("no route to host")
        except Exception as inner:
            raise DryRunError("the dry run failed") from inner

    monkeypatch.setattr(starflow.adapters.hub, "hub_offline", lambda: False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", dry_run)
    with pytest.raises(DownloadError) as info:
        download("t2i", tmp_path)
    if refused:
        assert "apple/starflow is gated or needs a login: accept its licence" in str(info.value)
    else:
        assert "is gated" not in str(info.value) and "cannot download" in str(info.value)
        assert "unset HF_HUB_OFFLINE" not in str(info.value)  # (it is not set)
        for asset in release_assets("t2i"):  # every file in place: no download needed, said so (exit 0)
            for pattern in asset.patterns:
                path = asset.target(tmp_path) / pattern.replace("*", "model")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"abc")
        assert download("t2i", tmp_path)


def test_download_fetches_each_repository_at_one_commit_and_records_it(tmp_path: Path, monkeypatch, capsys) -> None:
    """The files planned by the dry run are fetched from the commit it saw (``revision=`` of the real call), a
    ``--revision REPO=REV`` reaches that repository's calls, and ``downloads.json`` records each repository's commit
    and file sizes; a revision for a repository the release does not use, or one named twice, is refused."""
    import huggingface_hub
    from huggingface_hub.file_download import DryRunFileInfo

    import starflow.adapters.hub

    calls = []

    def snapshot_download(repo, allow_patterns, local_dir, token=None, revision=None, dry_run=False):
        calls.append((repo, revision, dry_run))
        names = [p.replace("*", "model") for p in allow_patterns]
        if dry_run:
            commit = {"main": "c0mmit", None: "c0mmit"}.get(revision, revision)
            return [DryRunFileInfo(commit_hash=f"{commit}-{repo}", file_size=3, filename=n,
                                   local_path=str(Path(local_dir) / n), is_cached=False, will_download=True)
                    for n in names]
        for n in names:
            (Path(local_dir) / n).parent.mkdir(parents=True, exist_ok=True)
            (Path(local_dir) / n).write_bytes(b"abc")
        return str(local_dir)

    monkeypatch.setattr(starflow.adapters.hub, "hub_offline", lambda: False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert main(["download", "t2i", "--local-dir", str(tmp_path), "--revision", "apple/starflow=v1"]) == 0
    assert ("apple/starflow", "v1", True) in calls and ("apple/starflow", "v1-apple/starflow", False) in calls
    assert ("google/flan-t5-xl", None, True) in calls and ("google/flan-t5-xl", "c0mmit-google/flan-t5-xl", False) in calls
    manifest = json.loads((tmp_path / "downloads.json").read_text())
    assert manifest["apple/starflow"] == {"commit": "v1-apple/starflow", "files": {"starflow_3B_t2i_256x256.pth": 3},
                                          "commits": {"starflow_3B_t2i_256x256.pth": "v1-apple/starflow"}}
    assert set(manifest) == {a.repo for a in release_assets("t2i")}
    assert "at commit c0mmit-stabilityai/sd-vae-ft-ema" in capsys.readouterr().out

    with pytest.raises(ValueError, match="the t2i release does not download Wan-AI/Wan2.2-TI2V-5B-Diffusers"):
        download("t2i", tmp_path, revisions={"Wan-AI/Wan2.2-TI2V-5B-Diffusers": "main"})
    assert main(["download", "t2i", "--local-dir", str(tmp_path), "--revision", "apple/starflow=a",
                 "--revision", "apple/starflow=b"]) == 2
    assert "--revision names apple/starflow more than once" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["download", "t2i", "--revision", "apple/starflow"])
    assert "expected REPO=REV" in capsys.readouterr().err

    # the other release from the same repository, at another commit: each file keeps its own in the record
    assert main(["download", "t2v", "--local-dir", str(tmp_path), "--revision", "apple/starflow=v2"]) == 0
    commits = json.loads((tmp_path / "downloads.json").read_text())["apple/starflow"]["commits"]
    assert commits["starflow_3B_t2i_256x256.pth"] == "v1-apple/starflow" and set(commits.values()) == {
        "v1-apple/starflow", "v2-apple/starflow"}

    monkeypatch.setattr(starflow.adapters.hub, "hub_offline", lambda: True)  # offline: checked against the record
    assert download("t2i", tmp_path, revisions={"apple/starflow": "v1-app"})
    assert "sizes checked against its downloads.json" in capsys.readouterr().out
    with pytest.raises(DownloadError, match="records commit v1-apple/starflow for its files: the files in place cannot"):
        download("t2i", tmp_path, revisions={"apple/starflow": "v2"})
    (tmp_path / "starflow_3B_t2i_256x256.pth").write_bytes(b"abcd")  # not the size recorded
    with pytest.raises(DownloadError,
                       match=r"starflow_3B_t2i_256x256.pth: 4 bytes, expected 3 \(as .*downloads.json records\): download"):
        download("t2i", tmp_path)
    (tmp_path / "starflow_3B_t2i_256x256.pth").unlink()  # missing: fetched by hand from the revision asked for
    with pytest.raises(DownloadError, match="huggingface.co/apple/starflow/resolve/v1/starflow_3B_t2i_256x256.pth"):
        download("t2i", tmp_path, revisions={"apple/starflow": "v1"})
