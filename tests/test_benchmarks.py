"""``benchmarks/train_step.py``: its analytic FLOP count equals ``torch.utils.flop_counter``'s, on image and video
layouts, and ``--profile`` prints where a step's time goes; the benchmarks' child processes and
``benchmarks/cuda_check.sh`` run on a machine where ``starflow`` is not installed."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # (the benchmarks import their own helpers as top-level modules)
try:
    import train_step
    from _args import child_env
finally:
    sys.path.remove(str(ROOT / "benchmarks"))  # not importable by the other test modules

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("layout, img_size", [
    (None, 4),  # the scaled demo: text in the top block only, one latent frame
    (None, 16),  # the benchmark's default: 256 tokens + 24 text positions, causal attention in two chunks
    ("configs/demo_moving_digits.yaml", None),  # pixel-space video: 4 frames (no VAE), frame-local blocks
])
def test_analytic_flops_equal_the_flop_counter(layout: str | None, img_size: int | None) -> None:
    args = argparse.Namespace(layout=str(ROOT / layout) if layout else None, img_size=img_size, batch=2,
                              device="cpu")
    cfg, model, x, y = train_step.build(args)
    if cfg.is_video:
        assert x.shape[1] == cfg.vid_size[0]  # no VAE: every pixel frame is a latent frame
    counted = train_step.counted_flops(model, x, y)
    assert train_step.step_flops(model, x, y, attention="chunked") == counted  # CPU: attention as causal chunks
    square = train_step.step_flops(model, x, y)
    assert train_step.step_flops(model, x, y, attention="none") < counted <= square
    if img_size == 16:  # 280 positions: two chunks, 3/4 of the square
        assert counted < square


def test_profile_prints_the_operators() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--img_size", "4", "--batch", "2",
                        "--profile", "1", "--warmup", "1", "--threads", "1"], capture_output=True, text=True,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "demo scaled (img_size 4, channels 192)" in r.stdout
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith("aten::")]
    assert rows and {"aten::mm", "aten::addmm"} <= {row[0] for row in rows}
    assert all(float(row[1]) >= 0 and row[2].endswith("%") for row in rows)


@pytest.mark.parametrize("layout, expected", [
    ("configs/starflow_3B_t2i_256x256.yaml", (4, 32, 32)),  # SD-VAE: 8x down, 4 channels
    ("configs/starflow-v_7B_t2v_caus_480p.yaml", (21, 48, 40, 40)),  # WAN2.2: 81 frames -> 21, 16x down
    ("configs/demo_moving_digits.yaml", (4, 1, 12, 12)),  # no VAE: every frame
    ("configs/demo_moving_digits_v2v.yaml", (8, 1, 12, 12)),  # a training sample: source clip, then target clip
])
def test_latent_shape_of_a_config(layout: str, expected: tuple[int, ...]) -> None:
    from starflow.config import load_config
    from starflow.sizing import latent_shape

    assert latent_shape(load_config(ROOT / layout)) == expected


def test_latent_shape_refuses_an_aspect_ratio_without_a_bucket() -> None:
    from starflow.config import load_config
    from starflow.sizing import latent_shape

    with pytest.raises(ValueError, match="16:9 is not one of this config's: 1:1"):
        latent_shape(load_config(ROOT / "configs" / "demo_digits.yaml"), "16:9")


def test_child_env_puts_the_repository_first_and_keeps_the_callers_path(monkeypatch) -> None:
    monkeypatch.setenv("PYTHONPATH", "/opt/site-packages")
    env = child_env(TORCHINDUCTOR_COMPILE_THREADS="1")
    assert env["PYTHONPATH"].split(":") == [str(ROOT), "/opt/site-packages"]
    assert env["TORCHINDUCTOR_COMPILE_THREADS"] == "1"
    monkeypatch.delenv("PYTHONPATH")
    assert child_env()["PYTHONPATH"] == str(ROOT)


def test_cuda_check_runs_the_cli_through_python_without_an_installed_starflow(tmp_path) -> None:
    """Every step runs ``$PYTHON -m starflow.cli ...`` (no ``starflow`` console script on the PATH): a stand-in
    Python records its arguments, so the script's plumbing is checked without running the steps."""
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "cuda_check.sh"), str(tmp_path / "out")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120,
                       env={"PATH": "/usr/bin:/bin", "PYTHON": str(fake), "DEVICE": "cpu", "STEPS": "sample paths"})
    lines = [line for line in r.stdout.splitlines() if " rc " in line]
    assert len(lines) == 12, r.stdout + r.stderr  # 6 sampling steps; the VAEs and 5 application and data paths
    assert all(line.split()[2] == "0" for line in lines), r.stdout
    cli = [line.split()[2] for line in calls.read_text().splitlines() if line.startswith("-m starflow.cli ")]
    assert cli.count("sample") == 5 and {"inpaint", "edit", "cache-latents", "train", "eval-nll"} <= set(cli)


@pytest.mark.parametrize("script, flags, message", [
    ("train_step.py", ["--modes", "eager,chekpoint"], "--modes eager,chekpoint: chekpoint is not one of"),
    ("train_step.py", ["--device", "nowhere"], "--device nowhere: not a torch device"),
    ("sampling.py", ["--thresholds", "-1"], "argument --thresholds: must be >= 0, got -1"),
])
def test_benchmark_flags_are_checked_before_any_work(script: str, flags: list[str], message: str) -> None:
    """A mistyped variant was timed as eager under its typo's name; now such flags are usage errors."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *flags], capture_output=True, text=True,
                       timeout=300, env=child_env(OMP_NUM_THREADS="1"))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
