"""``torchrun --nproc_per_node 2 starflow train`` on CPU (gloo): FSDP2 (also with the T5 sharded) and DDP with
gradient accumulation give the one-process losses, FSDP2 in bf16 follows them, and a
2-process run killed during a save and again mid-training resumes onto the uninterrupted loss curve.

The model is the tiny text-to-image STARFlow of ``conftest.TINY_CONFIG`` with the learnable denoiser, on real
8x8 digits.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from starflow.cli import main
from starflow.train.state import KILL_DURING_SAVE_ENV

from helpers import losses, run_env, train_cmd

STEPS = 30


@pytest.fixture(scope="module")
def runs(tiny_config, digits, tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("dist_train")
    config = dict(tiny_config, data=str(digits["train"]), steps=STEPS, batch_size=8, save_freq=5, keep_last=3,
                  learnable_self_denoiser=1, conditional_denoiser=1, denoiser_lr=1e-3, fsdp=1, ema=0.9)
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    out = {}
    variants = (("one", 1, ()), ("fsdp", 2, ()), ("fsdp_t5", 2, ("--fsdp_text_encoder", "1")),
                ("ddp_accum", 2, ("--fsdp", "0", "--grad_accum", "2", "--fsdp_text_encoder", "1", "--sample_freq", "4")), ("fsdp_bf16", 2, ("--precision", "bf16")),
                ("fsdp_one_rank", 1, ("--sample_freq", "4")))
    for name, nproc, extra in variants:
        out[name] = tmp / name
        r = subprocess.run(train_cmd(tmp / "config.yaml", out[name], nproc, *extra, torchrun=name != "one"),
                           env=run_env(tmp), capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        (out[name] / "stdout.txt").write_text(r.stdout)
    out["tmp"], out["config"] = tmp, tmp / "config.yaml"
    return out


@pytest.mark.parametrize("name", ["fsdp", "fsdp_t5", "ddp_accum", "fsdp_one_rank"])
def test_two_processes_match_one_process(runs, name: str) -> None:
    """Same global batch and seed: the same loss at every step (relative 1e-5); also for FSDP2 over the one rank
    of ``torchrun --nproc_per_node 1`` (as on a one-GPU machine)."""
    one, two = losses(runs["one"]), losses(runs[name])
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for step in one:
        for key in ("loss", "denoiser_loss"):
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-5), (step, key)
    assert one[STEPS]["loss"] < one[1]["loss"] - 0.05  # it learns
    if name in ("ddp_accum", "fsdp_one_rank"):  # DDP with the T5 sharded: every rank samples the grids (rank 0 alone
        # would hang); sampling leaves the training noise stream as it was
        assert sorted(p.name for p in (runs[name] / "samples").iterdir()) == ["step_00000016.png", "step_00000030.png"]
    mode = {"fsdp": "(FSDP2)", "fsdp_t5": "(FSDP2)", "ddp_accum": "(DDP)", "fsdp_one_rank": "1 process(es) (FSDP2)"}
    assert mode[name] in (runs[name] / "stdout.txt").read_text()
    assert "(unsharded: fsdp 1 shard under torchrun)" in (runs["one"] / "stdout.txt").read_text()  # no torchrun


def test_sharded_bf16_run_follows_the_float32_losses(runs) -> None:
    """``--precision bf16`` under FSDP2 on CPU (gloo): bf16 parameters while computing, float32 gradients and
    weights; the loss curve follows the float32 FSDP2 one closely, and differs from it by more than the last bits
    that already separate FSDP2 from one process (bf16 is not silently ignored)."""
    fp32, bf16 = losses(runs["fsdp"]), losses(runs["fsdp_bf16"])
    assert sorted(bf16) == sorted(fp32)
    got, want = np.array([bf16[s]["loss"] for s in sorted(fp32)]), np.array([fp32[s]["loss"] for s in sorted(fp32)])
    assert np.abs(got / want - 1).max() > 1e-4
    np.testing.assert_allclose(got, want, rtol=3e-2)
    weights = load_file(runs["fsdp_bf16"] / "model" / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float32}


def test_sharded_run_exports_the_same_weights(runs, tmp_path) -> None:
    """The final model folder (gathered from the shards) equals `starflow export` of the last checkpoint, and
    its weights and EMA are close to the one-process ones."""
    assert main(["export", str(runs["fsdp"]), str(tmp_path / "w.safetensors")]) == 0
    exported, final = load_file(tmp_path / "w.safetensors"), load_file(runs["fsdp"] / "model" / "model.safetensors")
    single = load_file(runs["one"] / "model" / "model.safetensors")
    assert exported.keys() == final.keys() == single.keys()
    for k in final:
        assert torch.equal(exported[k], final[k]), k
        assert torch.allclose(final[k], single[k], atol=1e-4), k
    # the moving average, gathered from the shards one parameter at a time, is the one-process average
    ema = load_file(runs["fsdp"] / "model" / "ema.safetensors")
    single_ema = load_file(runs["one"] / "model" / "ema.safetensors")
    assert ema.keys() == single_ema.keys() and ema.keys() <= final.keys()
    for k in ema:
        assert torch.allclose(ema[k], single_ema[k], atol=1e-4), k
    assert any(not torch.allclose(ema[k], final[k], atol=1e-3) for k in ema)  # an average, not the weights
    shards = sorted(p.name for p in (runs["fsdp"] / "checkpoints" / f"step_{STEPS:08d}").glob("*.distcp"))
    assert len(shards) == 2  # each rank wrote its own shards


def test_a_sharded_run_killed_before_its_grid_draws_it_on_resume(runs, tmp_path: Path) -> None:
    """Killed after the step-20 checkpoint, before that step's sample grid: the rerun resumes there and draws the grid
    before its first step, with FSDP2 layers that have not gathered their weights in a training step yet (sampling
    under inference mode must not leave their gathered weights inference tensors: every step after it would fail),
    then trains on to the end, onto the uninterrupted loss curve."""
    logdir = tmp_path / "run"
    shutil.copytree(runs["fsdp_one_rank"], logdir)
    for name in ("step_00000025", "step_00000030"):  # killed after step 20: its checkpoint is the latest
        shutil.rmtree(logdir / "checkpoints" / name)
    shutil.rmtree(logdir / "samples")
    r = subprocess.run(train_cmd(runs["config"], logdir, 1, "--sample_freq", "5", torchrun=True),  # grids at 20, 30
                       env=run_env(runs["tmp"]), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout + r.stderr
    assert sorted(p.name for p in (logdir / "samples").iterdir()) == ["step_00000020.png", "step_00000030.png"]
    got, ref = losses(logdir), losses(runs["fsdp_one_rank"])
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for step in range(21, STEPS + 1):
        assert got[step]["loss"] == ref[step]["loss"], step  # the grid left the training noise stream as it was


def test_killed_runs_resume_onto_the_uninterrupted_curve(runs) -> None:
    tmp, logdir = runs["tmp"], runs["tmp"] / "killed"
    # 1. killed (SIGKILL) while writing the step-10 checkpoint: step 5 stays the latest complete one
    r = subprocess.run(train_cmd(runs["config"], logdir, 2), env=run_env(tmp, **{KILL_DURING_SAVE_ENV: "10"}),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    ckpts = sorted(p.name for p in (logdir / "checkpoints").iterdir())
    assert ckpts == ["step_00000005", "step_00000010.partial"], ckpts
    # 2. resumed from step 5, then killed from outside mid-training (after step 13 is logged)
    proc = subprocess.Popen(train_cmd(runs["config"], logdir, 2), env=run_env(tmp), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and max(losses(logdir)) < 13:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    logged = max(losses(logdir))
    assert 13 <= logged < STEPS, "the run was not interrupted mid-training"
    # 3. resumed again, to the end
    r = subprocess.run(train_cmd(runs["config"], logdir, 2), env=run_env(tmp), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout + r.stderr
    got, ref = losses(logdir), losses(runs["fsdp"])
    assert sorted(got) == sorted(ref)
    for step in ref:
        for key in ("loss", "denoiser_loss", "grad_norm", "lr"):
            assert got[step][key] == ref[step][key], (step, key)  # the same computation, bit for bit
    ema = load_file(logdir / "model" / "ema.safetensors")
    ref_ema = load_file(runs["fsdp"] / "model" / "ema.safetensors")
    assert all(torch.equal(ema[k], ref_ema[k]) for k in ref_ema)  # the average resumes from its checkpoint too
    assert not any(p.name.endswith(".partial") for p in (logdir / "checkpoints").iterdir())


FROM_RANK0 = r"""
import sys, torch.distributed as dist
from pathlib import Path
from starflow.distributed import from_rank0
dist.init_process_group("gloo")
rank, out = dist.get_rank(), Path(sys.argv[1])

def index():
    (out / f"made_on_{rank}").touch()
    return {"paths": ["a.png", "b.png"], "by": rank}

def broken():
    raise ValueError("metadata.jsonl:3: needs a string 'text'")

lines = [f"{rank} {from_rank0(index)}"]
try:
    from_rank0(broken)
except ValueError as err:
    lines.append(f"{rank} raised {err}")
(out / f"rank_{rank}.txt").write_text("\n".join(lines) + "\n")  # a file each: the ranks' stdout interleaves
dist.destroy_process_group()
"""


def test_a_folder_is_indexed_on_rank_0_only(tmp_path: Path) -> None:
    """``from_rank0`` (the training folder's index, its file checks and headers): made once, on rank 0, the same
    object on every rank; an error there is raised on every rank instead of leaving them waiting."""
    (tmp_path / "script.py").write_text(FROM_RANK0)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(tmp_path / "script.py"), str(tmp_path)], env=run_env(tmp_path), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("made_on_*")) == ["made_on_0"]
    lines = sorted(line for rank in (0, 1) for line in (tmp_path / f"rank_{rank}.txt").read_text().splitlines())
    assert lines == ["0 raised metadata.jsonl:3: needs a string 'text'", "0 {'paths': ['a.png', 'b.png'], 'by': 0}",
                     "1 raised metadata.jsonl:3: needs a string 'text'", "1 {'paths': ['a.png', 'b.png'], 'by': 0}"]


def test_each_process_takes_its_own_gpu(monkeypatch) -> None:
    """``--device cuda`` under torchrun: rank ``r`` takes ``cuda:{LOCAL_RANK % GPUs}`` (``torch.cuda.set_device``
    needs an index); ``cuda:N`` for several processes would put every rank on one GPU, which NCCL refuses."""
    from starflow.distributed import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert pick_device("cuda", local_rank=3, world_size=8) == torch.device("cuda", 3)
    assert pick_device("cuda", local_rank=5, world_size=8) == torch.device("cuda", 1)
    assert pick_device(None, local_rank=2, world_size=8) == torch.device("cuda", 2)
    assert pick_device("cuda") == pick_device(None) == torch.device("cuda", 0)
    assert pick_device("cuda:2") == torch.device("cuda", 2)
    with pytest.raises(ValueError, match="names one GPU for all 8 processes"):
        pick_device("cuda:1", local_rank=0, world_size=8)
    with pytest.raises(ValueError, match="there are 4 GPU"):
        pick_device("cuda:4")


def test_an_error_under_torchrun_is_one_line_and_the_launcher_names_it(tmp_path: Path) -> None:
    """Every rank meets the same bad flag: rank 0 prints it once, and each rank records it in torchrun's error file,
    so the launcher's failure summary names the error (of whichever rank failed first)."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    r = subprocess.run([*launch, "-m", "starflow.cli", "sample", "--caption", "x", "--cfg", "-1", "--device", "cpu",
                        "--output_dir", str(tmp_path / "out")], env=run_env(tmp_path), capture_output=True, text=True,
                       timeout=300)
    line = "error: --cfg -1: the guidance weight must be >= 0 and finite"
    assert r.returncode != 0 and r.stderr.count("\n" + line) + r.stderr.startswith(line) == 1, r.stderr[-3000:]
    assert r.stderr.count(f"traceback : {line}") == 2  # torchrun's summary: rank 0's and rank 1's record
    assert not (tmp_path / "out").exists()


def test_cpu_ranks_shard_onto_the_cpu_on_a_gpu_machine(tiny_config, tmp_path: Path, monkeypatch) -> None:
    """``--device cpu`` under torchrun on a machine with GPUs: FSDP2 shards the flow and the T5 onto the ranks' device
    (the CPU), not onto the accelerator ``fully_shard`` picks without a mesh (a GPU machine is simulated: the
    accelerator PyTorch reports is CUDA)."""
    import torch.distributed as dist

    from starflow.adapters import build_text_encoder
    from starflow.config import load_config
    from starflow.distributed import DistInfo
    from starflow.models import STARFlow
    from starflow.train.parallelize import parallelize, shard_text_encoder

    cfg = load_config(dict(tiny_config, fsdp=1))
    text_encoder = build_text_encoder(cfg)
    torch.manual_seed(0)
    model = STARFlow(cfg, txt_dim=text_encoder.hidden_size)
    x = torch.randn(2, 1, 8, 8)
    want = model.loss(x, text_encoder(["a 1", "a 2"]))["loss"].item()
    monkeypatch.setattr(torch._C, "_get_accelerator", lambda: torch.device("cuda"))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        rank = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))  # (as a rank of several)
        parallelize(model, cfg, rank)
        shard_text_encoder(text_encoder.encoder, rank)
        meshes = {p.device_mesh.device_type for m in (model, text_encoder.encoder) for p in m.parameters()}
        got = model.loss(x, text_encoder(["a 1", "a 2"]))["loss"]
        got.backward()
    finally:
        dist.destroy_process_group()
    assert meshes == {"cpu"}
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_the_process_group_waits_half_an_hour_for_rank_0(monkeypatch) -> None:
    """Under torchrun the default group's collectives wait :data:`PROCESS_GROUP_TIMEOUT` (30 minutes; NCCL's own
    default is 10): rank 0 alone writes the model folder at the end, while the other ranks wait for it."""
    import torch.distributed as dist

    import starflow.distributed as distributed

    seen = {}
    monkeypatch.setattr(distributed, "stop_with_launcher", lambda: True)  # (not this test process)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: seen.update(kw, backend=backend))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    distributed.init_distributed("cpu")
    assert seen["backend"] == "gloo" and seen["timeout"] == distributed.PROCESS_GROUP_TIMEOUT
    assert distributed.PROCESS_GROUP_TIMEOUT.total_seconds() == 30 * 60
