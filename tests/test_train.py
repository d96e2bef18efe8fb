"""Training: the loss goes down, the schedule, exact resume, checkpoint files, dry runs, skipped updates, errors.

Everything runs a tiny text-to-image model (see ``conftest.TINY_CONFIG``) on a few real 8x8 digits on CPU.
"""
from __future__ import annotations

import copy
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
import yaml

from starflow.adapters import build_text_encoder
from starflow.cli import main
from starflow.config import load_config
from starflow.data import ImageFolder, collate
from starflow.distributed import init_distributed
from starflow.models import STARFlow
from starflow.train import launch
from starflow.train.optim import WARMUP_START_LR, build_optimizer, build_schedule, lr_at
from starflow.train.state import CheckpointManager
from starflow.train.trainer import Trainer, TrainingDiverged

from helpers import read_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def build_trainer(config: dict[str, Any], logdir: Path) -> Trainer:
    """A :class:`Trainer` built exactly as ``starflow train`` builds it (one CPU process)."""
    return launch.build_trainer(load_config(config, {"logdir": str(logdir)}), init_distributed("cpu"))


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def read_metrics(logdir: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]


def train_args(config_file: Path, data: Path, logdir: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(config_file), "--data", str(data), "--logdir", str(logdir), "--device", "cpu",
            *extra]


# ---------------------------------------------------------------------- the loss goes down
def test_training_lowers_loss_on_a_fixed_batch(tiny_config, digits) -> None:
    cfg = load_config(dict(tiny_config, steps=30, warmup_steps=0, lr=1e-3, drop_label=0.0))
    text_encoder = build_text_encoder(cfg, device="cpu")
    torch.manual_seed(0)
    model = STARFlow.from_config(cfg, txt_dim=text_encoder.hidden_size, vae_downsample=1).train()
    data = ImageFolder(digits["train"], cfg.img_size, cfg.channel_size, multiple=cfg.patch_size)
    batch = collate([data[i] for i in range(cfg.batch_size)])
    y = text_encoder(batch["text"])  # (B, L, 32)
    noise = torch.randn(batch["pixels"].shape, generator=torch.Generator().manual_seed(1))
    x = batch["pixels"] + cfg.noise_std * noise  # (B, 1, 8, 8), one fixed noised batch
    optimizer = build_optimizer(model.parameters(), cfg)
    schedule = build_schedule(optimizer, cfg)
    before = snapshot(model)

    losses = []
    for _ in range(cfg.steps):
        loss = model.loss(x, y)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = model.loss(x, y)["loss"].item()

    assert all(math.isfinite(v) for v in losses + [final])
    assert final < losses[0] - 0.1, f"loss went {losses[0]:.4f} -> {final:.4f} in {cfg.steps} steps"
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("proj_out.weight" in k for k in changed)  # zero-initialised output layers now learn
    assert len(changed) > len(before) // 2
    assert optimizer.param_groups[0]["lr"] == pytest.approx(cfg.min_lr)  # the schedule ran to its end


# ---------------------------------------------------------------------- schedule
@pytest.mark.parametrize("min_lr", [1e-5, 1e-7])
def test_lr_schedule_warmup_then_cosine(min_lr: float) -> None:
    cfg = load_config(dict(lr=1e-3, min_lr=min_lr, warmup_steps=10, steps=100))
    assert lr_at(0, cfg) == pytest.approx(min(min_lr, WARMUP_START_LR))
    assert lr_at(0, cfg) == pytest.approx(min(min_lr, 1e-6))
    warmup = [lr_at(s, cfg) for s in range(11)]
    assert all(a < b for a, b in zip(warmup, warmup[1:]))  # linear warm-up, increasing
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(5, cfg) == pytest.approx((min(min_lr, 1e-6) + 1e-3) / 2)
    decay = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a > b for a, b in zip(decay, decay[1:]))  # strictly decreasing cosine
    assert lr_at(55, cfg) == pytest.approx((1e-3 + min_lr) / 2)  # cosine midpoint
    assert lr_at(100, cfg) == pytest.approx(min_lr)
    assert lr_at(150, cfg) == pytest.approx(min_lr)  # stays at min_lr after the end


def test_schedule_follows_lr_at() -> None:
    cfg = load_config(dict(lr=1e-3, min_lr=1e-5, warmup_steps=3, steps=12))
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg)
    schedule = build_schedule(optimizer, cfg)
    for step in range(15):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(lr_at(step, cfg), rel=1e-12)
        optimizer.step()
        schedule.step()


def test_no_warmup_starts_at_peak_lr() -> None:
    cfg = load_config(dict(lr=1e-3, min_lr=1e-5, warmup_steps=0, steps=20))
    assert lr_at(0, cfg) == pytest.approx(1e-3)
    assert lr_at(20, cfg) == pytest.approx(1e-5)


# ---------------------------------------------------------------------- exact resume
def training_state(trainer: Trainer) -> dict[str, Any]:
    """Copies of what a resume must restore."""
    return {"step": trainer.step, "latest": trainer.checkpoints.latest().name, "model": snapshot(trainer.model),
            "optimizer": copy.deepcopy(trainer.optimizer.state_dict()), "lr": trainer.optimizer.param_groups[0]["lr"],
            "data": (trainer.batches.epoch, trainer.batches.skip)}


@pytest.fixture(scope="module")
def resume_runs(tiny_config, digits, tmp_path_factory, one_thread) -> dict[str, Any]:
    """6 steps via ``starflow train``; and 3 steps, then a fresh Trainer resuming from the checkpoint, 3 more.

    32 images in batches of 8: the runs cross an epoch boundary after step 4, past the resume point.
    """
    tmp = tmp_path_factory.mktemp("resume")
    config = dict(tiny_config, data=str(digits["train"]), steps=6, save_freq=2, keep_last=2, log_freq=1)
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    straight, split = tmp / "straight", tmp / "split"
    with torch.random.fork_rng(devices=[]):
        assert main(train_args(tmp / "config.yaml", digits["train"], straight)) == 0
        first = build_trainer(config, split)
        resumed_before_start = first.resume()
        history = first.fit(max_steps=3)
        at_three = training_state(first)
        partial = split / "checkpoints" / "step_00000004.partial"  # a run killed while saving step 4
        partial.mkdir()
        (partial / "__0_0.distcp").write_bytes(b"half a shard")
        second = build_trainer(config, split)  # a new process: fresh weights, optimizer and RNG
        resumed = second.resume()
        after_resume = training_state(second)
        history += second.fit()
    return dict(straight=straight, split=split, reference=read_metrics(straight), history=history,
                resumed_before_start=resumed_before_start, resumed=resumed, at_three=at_three,
                after_resume=after_resume, final_step=second.step)


def test_resume_restores_model_optimizer_schedule_step_and_data(resume_runs) -> None:
    r = resume_runs
    assert not r["resumed_before_start"]  # nothing to resume from in an empty logdir
    assert r["resumed"]
    a, b = r["at_three"], r["after_resume"]
    assert a["step"] == b["step"] == 3
    assert a["latest"] == b["latest"] == "step_00000003"  # the partial step-4 folder is ignored
    assert same_state(a["model"], b["model"])
    assert a["lr"] == b["lr"] and a["data"] == b["data"] == (0, 3)
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert all(torch.equal(sa[k][name], sb[k][name]) for name in sa[k])
    assert r["final_step"] == 6
    assert [m["step"] for m in r["reference"]] == [m["step"] for m in r["history"]] == [1, 2, 3, 4, 5, 6]
    assert [m["step"] for m in read_metrics(r["split"])] == [1, 2, 3, 4, 5, 6]
    # before the interruption both runs are the same computation (the Trainer API matches `starflow train`)
    assert [m["loss"] for m in r["history"][:3]] == [m["loss"] for m in r["reference"][:3]]


def test_samples_per_s_covers_the_steps_since_the_last_log_and_leaves_checkpointing_out(
        tiny_config, digits, tmp_path, monkeypatch) -> None:
    """The trainer's clock jumps by 100 s in every checkpoint save: ``elapsed_s`` (wall time) counts the jump,
    ``samples_per_s`` (the steps since the last logged one) does not; deterministic whatever the machine's load."""
    import types

    import starflow.train.trainer as trainer_module

    jump = [0.0]
    clock = types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + jump[0])
    monkeypatch.setattr(trainer_module, "time", clock)
    save = Trainer.save

    def slow_save(self, *args, **kwargs):
        out = save(self, *args, **kwargs)
        jump[0] += 100.0
        return out

    monkeypatch.setattr(Trainer, "save", slow_save)
    config = dict(tiny_config, data=str(digits["train"]), steps=5, save_freq=2, log_freq=1)
    with torch.random.fork_rng(devices=[]):
        rows = build_trainer(config, tmp_path / "run").fit()
    batch = 8
    assert [m["step"] for m in rows] == [1, 2, 3, 4, 5]
    for prev, m in zip(rows, rows[1:]):
        wall = m["elapsed_s"] - prev["elapsed_s"]
        counted = batch / m["samples_per_s"]  # the time samples_per_s covers: the one step since the last row
        assert 0 < counted <= wall
        if prev["step"] % 2 == 0:  # a checkpoint was saved between the rows: in the wall time only
            assert wall - counted >= 100.0
        else:
            assert wall - counted < 50.0
    assert rows[0]["elapsed_s"] == pytest.approx(batch / rows[0]["samples_per_s"])  # the first row: one step
    cfg = load_config(config)
    assert [m["lr"] for m in rows] == [pytest.approx(lr_at(s, cfg), rel=1e-12) for s in range(5)]  # the applied rate
    # a resumed run continues the clock of the run it resumes (the wall time between the runs is not counted)
    resumed = build_trainer(dict(config, steps=7), tmp_path / "run")
    assert resumed.resume() and resumed.step == 5
    more = resumed.fit()
    assert [m["step"] for m in more] == [6, 7]
    assert 0 < more[0]["elapsed_s"] - rows[-1]["elapsed_s"] < 50.0
    # a checkpoint between logged steps is left out too: log_freq 3, save_freq 2 (saves at 2 and 4, rows at 3 and 5)
    config = dict(config, log_freq=3, save_freq=2)
    with torch.random.fork_rng(devices=[]):
        rows = build_trainer(config, tmp_path / "run2").fit()
    logged = {m["step"]: m for m in read_metrics(tmp_path / "run2")}
    assert sorted(logged) == [3, 5]
    assert logged[3]["elapsed_s"] >= 100.0 and 3 * batch / logged[3]["samples_per_s"] < 50.0
    assert logged[5]["elapsed_s"] - logged[3]["elapsed_s"] >= 100.0 and 2 * batch / logged[5]["samples_per_s"] < 50.0


def test_resumed_run_matches_the_uninterrupted_run(resume_runs) -> None:
    r = resume_runs
    got = read_metrics(r["split"])
    for key in ("loss", "loss_z", "loss_logdet", "lr", "grad_norm"):
        ref = [m[key] for m in r["reference"]]
        assert [m[key] for m in r["history"]] == ref, key  # bit-exact: same computation
        assert [m[key] for m in got] == ref, key
    final_a = read_checkpoint(CheckpointManager(r["straight"] / "checkpoints").latest(), r["straight"])
    final_b = read_checkpoint(CheckpointManager(r["split"] / "checkpoints").latest(), r["split"])
    assert final_a["meta"]["step"] == final_b["meta"]["step"] == 6
    for k, v in final_a["model"].items():
        assert torch.equal(final_b["model"][k], v), k



def test_sampling_during_training_leaves_the_run_unchanged(resume_runs, tmp_path) -> None:
    """``sample_freq``: sample grids mid-run (in inference mode, eval mode), then training goes on bit-exactly."""
    straight = resume_runs["straight"]
    config = yaml.safe_load((straight.parent / "config.yaml").read_text())
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(dict(config, sample_freq=1)))
    assert main(train_args(tmp_path / "config.yaml", Path(config["data"]), tmp_path / "run")) == 0
    # sample_freq counts epochs: 32 images in batches of 8 are 4 steps; and the last step
    assert sorted(p.name for p in (tmp_path / "run" / "samples").iterdir()) == ["step_00000004.png",
                                                                                "step_00000006.png"]
    keys = ("step", "loss", "loss_z", "loss_logdet", "grad_norm", "lr")
    assert ([[m[k] for k in keys] for m in read_metrics(tmp_path / "run")]
            == [[m[k] for k in keys] for m in resume_runs["reference"]])
    # killed after its last checkpoint, before its grid: the rerun draws the grid of the step it resumes at
    grid = tmp_path / "run" / "samples" / "step_00000006.png"
    drawn = grid.read_bytes()
    grid.unlink()
    assert main(train_args(tmp_path / "config.yaml", Path(config["data"]), tmp_path / "run")) == 0
    assert grid.read_bytes() == drawn

def test_resume_applies_a_changed_schedule_and_keeps_each_step_once_in_the_metrics(resume_runs, tmp_path,
                                                                                    capsys) -> None:
    """A run stopped after its step-6 line but resumed from step 4 with a lower lr and more steps: from step 5 on it
    follows the new schedule (the same rates as a run started with it), and metrics.jsonl holds each step once; the
    changed keys are named."""
    run = tmp_path / "run"
    shutil.copytree(resume_runs["straight"], run)
    shutil.rmtree(run / "checkpoints" / "step_00000006")  # killed after logging step 6, before saving it
    config = yaml.safe_load((resume_runs["straight"].parent / "config.yaml").read_text())
    changed = dict(config, lr=config["lr"] / 10, steps=8)
    (tmp_path / "changed.yaml").write_text(yaml.safe_dump(changed))
    with torch.random.fork_rng(devices=[]):
        metrics = (run / "metrics.jsonl").read_text()
        assert main(train_args(tmp_path / "changed.yaml", Path(config["data"]), run, "--dry_run")) == 0
        assert "resumed from" in capsys.readouterr().out  # the dry run resumes as the run will, and writes nothing
        assert (run / "metrics.jsonl").read_text() == metrics
        assert main(train_args(tmp_path / "changed.yaml", Path(config["data"]), run)) == 0
        out = capsys.readouterr().out
        assert (f"resuming with changed config keys, which apply from step 4 on: lr {config['lr']} -> "
                f"{config['lr'] / 10}, steps {config['steps']} -> 8 (") in out
        assert "training data differ" not in out
        assert main(train_args(tmp_path / "changed.yaml", Path(config["data"]), tmp_path / "fresh")) == 0
    got, fresh = read_metrics(run), read_metrics(tmp_path / "fresh")
    assert [m["step"] for m in got] == list(range(1, 9))
    assert [m["lr"] for m in got[:4]] == [m["lr"] for m in resume_runs["reference"][:4]]
    assert [m["lr"] for m in got[4:]] == [m["lr"] for m in fresh[4:]]
    assert got[4]["lr"] != resume_runs["reference"][4]["lr"]  # (the new schedule, not the checkpoint's)


def test_resume_on_changed_training_data_says_so(resume_runs, tmp_path, capsys) -> None:
    """Checkpoints record the training data's listing (:func:`data_fingerprint`): a resume on a folder with fewer
    images, or with the same number under other captions, names the change (a note: the run goes on)."""
    run = tmp_path / "run"
    shutil.copytree(resume_runs["straight"], run)
    config = yaml.safe_load((resume_runs["straight"].parent / "config.yaml").read_text())
    data = tmp_path / "data"
    shutil.copytree(config["data"], data)
    lines = (data / "metadata.jsonl").read_text().splitlines()
    (data / "metadata.jsonl").write_text("\n".join(lines[:-8]) + "\n")
    assert main(train_args(resume_runs["straight"].parent / "config.yaml", data, run, "--dry_run")) == 0
    out = capsys.readouterr().out
    assert f"note: the training data differ from those {run / 'checkpoints' / 'step_00000006'} was trained on " \
           f"({len(lines)} -> {len(lines) - 8} samples)" in out
    recaptioned = [json.dumps(dict(json.loads(line), text="another caption")) for line in lines]
    (data / "metadata.jsonl").write_text("\n".join(recaptioned) + "\n")
    assert main(train_args(resume_runs["straight"].parent / "config.yaml", data, run, "--dry_run")) == 0
    assert f"(the same {len(lines)} samples in number, another listing)" in capsys.readouterr().out


def test_resume_with_another_seed_of_the_tiny_text_encoder_is_refused(resume_runs, tmp_path, capsys) -> None:
    """The built-in tiny T5 is drawn from ``seed``: another seed at a resume would swap the encoder under the flow."""
    run = tmp_path / "run"
    shutil.copytree(resume_runs["straight"], run)
    config = yaml.safe_load((resume_runs["straight"].parent / "config.yaml").read_text())
    assert config["text"] == "tiny-t5"
    (tmp_path / "seeded.yaml").write_text(yaml.safe_dump(dict(config, seed=config.get("seed", 0) + 5)))
    metrics = (run / "metrics.jsonl").read_text()
    assert main(train_args(tmp_path / "seeded.yaml", Path(config["data"]), run, "--dry_run")) == 2
    assert "was trained with the built-in tiny text encoder drawn from seed" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == metrics


def test_resume_with_another_grad_accum_continues_the_data_order(resume_runs, tmp_path) -> None:
    """The global batches do not depend on grad_accum, so a run resumed with another one (to keep the batch size on
    fewer ranks) trains on the batches the uninterrupted run did."""
    run = tmp_path / "run"
    shutil.copytree(resume_runs["straight"], run)
    shutil.rmtree(run / "checkpoints" / "step_00000006")  # resume from step 4
    config = yaml.safe_load((resume_runs["straight"].parent / "config.yaml").read_text())
    with torch.random.fork_rng(devices=[]):
        trainer = build_trainer(dict(config, grad_accum=2), run)
        assert trainer.resume() and trainer.step == 4
        rows = trainer.fit()
    reference = {m["step"]: m for m in resume_runs["reference"]}
    assert [m["step"] for m in rows] == [5, 6]
    for key in ("loss", "grad_norm"):  # (the gradient norm: the micro-batches' gradients are averaged, not summed)
        assert [m[key] for m in rows] == [pytest.approx(reference[s][key], rel=1e-5) for s in (5, 6)], key


def test_resume_applies_a_changed_weight_decay_and_skips_by_samples_for_another_batch_size(resume_runs, tmp_path,
                                                                                            capsys) -> None:
    """A resume takes the config's optimizer settings (the checkpoint's param groups held the old weight_decay), and
    a new batch_size in mid-epoch skips the samples already consumed, not that many steps of the new batches."""
    run = tmp_path / "run"
    shutil.copytree(resume_runs["straight"], run)  # step 6: epoch 1 (4 steps of 8 of 32 images each), 2 steps in
    config = yaml.safe_load((resume_runs["straight"].parent / "config.yaml").read_text())
    with torch.random.fork_rng(devices=[]):
        trainer = build_trainer(dict(config, weight_decay=0.5, batch_size=16, steps=8), run)
        assert trainer.resume() and trainer.step == 6
    assert [g["weight_decay"] for g in trainer.optimizer.param_groups] == [0.5]
    assert (trainer.batches.epoch, trainer.batches.skip) == (1, 1)  # 2 x 8 samples = 1 batch of 16
    assert ("batch_size 8 -> 16 in mid-epoch: this epoch's batches are formed anew, and the run skips 1 of them, as "
            "many samples as the 16 consumed") in capsys.readouterr().out


def test_resume_keeps_the_last_checkpoints(resume_runs) -> None:
    for run in ("straight", "split"):
        names = sorted(p.name for p in (resume_runs[run] / "checkpoints").iterdir())
        assert names == ["step_00000004", "step_00000006"], run


def test_checkpoints_pruned_to_keep_last(tiny_config, digits, config_file, tmp_path) -> None:
    config = dict(tiny_config, steps=5, save_freq=1, keep_last=2)
    logdir = tmp_path / "run"
    assert main(train_args(config_file(config), digits["train"], logdir)) == 0
    names = sorted(p.name for p in (logdir / "checkpoints").iterdir())
    assert names == ["step_00000004", "step_00000005"]
    state = read_checkpoint(logdir / "checkpoints" / names[-1], tmp_path)
    assert {"model", "optimizer", "meta"} <= state.keys()
    assert state["meta"]["step"] == 5 and state["meta"]["schedule"]["last_epoch"] == 5
    local = CheckpointManager.load_local(logdir / "checkpoints" / names[-1], 0)
    assert {"data", "rng"} <= local.keys()
    assert (logdir / "config.yaml").is_file() and (logdir / "model" / "config.yaml").is_file()
    assert load_config(logdir / "config.yaml").keep_last == 2  # the resolved config is saved beside them


def test_checkpoint_manager_ignores_partial_folders(tmp_path) -> None:
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    assert manager.latest() is None
    for step in (1, 2, 3):
        manager.save(step, {"w": torch.full((3,), float(step))}, {"step": step}, {"rank": 0})
    assert [p.name for p in manager.checkpoints()] == ["step_00000002", "step_00000003"]
    leftover = manager.folder / "step_00000004.partial"  # a run killed while writing step 4
    leftover.mkdir()
    (manager.folder / "notes.txt").write_text("not a checkpoint")
    assert manager.latest().name == "step_00000003"
    tensors = {"w": torch.zeros(3)}
    meta, local = manager.load(manager.latest(), tensors)
    assert meta == {"step": 3} and local == {"rank": 0} and torch.equal(tensors["w"], torch.full((3,), 3.0))
    manager.save(5, {"w": torch.zeros(3)}, {"step": 5}, {})
    assert [p.name for p in manager.checkpoints()] == ["step_00000003", "step_00000005"]
    assert not leftover.exists()  # the next save clears what a killed save left


def test_ctrl_c_while_a_checkpoint_is_written_is_an_interruption_not_a_disk_error(tmp_path, monkeypatch) -> None:
    """DCP hands a KeyboardInterrupt raised inside its save (a second Ctrl-C) back wrapped in a CheckpointException:
    it stays an interruption (exit 130, not the "cannot write the checkpoint" disk message) and the half-written
    folder goes; the earlier checkpoint stays."""
    import torch.distributed.checkpoint as dcp

    manager = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    manager.save(1, {"w": torch.ones(3)}, {"step": 1}, {})
    real_save = dcp.save

    def interrupted_save(tensors, checkpoint_id):
        real_save(tensors, checkpoint_id=checkpoint_id)  # (the files are written, then the signal arrives)
        raise dcp.api.CheckpointException("save failed", {0: (KeyboardInterrupt(), None)})

    monkeypatch.setattr(dcp, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt, match="interrupted while writing the checkpoint .*step_00000002"):
        manager.save(2, {"w": torch.zeros(3)}, {"step": 2}, {})
    assert [p.name for p in manager.folder.iterdir()] == ["step_00000001"]


def test_a_checkpoint_that_cannot_be_written_keeps_the_earlier_ones(tmp_path) -> None:
    """A save that fails part way (here a file-size limit, as a full disk or a quota) says so in one line and removes
    its half-written folder; the earlier checkpoint stays."""
    import subprocess
    import sys

    script = f"""
import resource, signal, torch
from starflow.train.state import CheckpointManager
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing
manager = CheckpointManager({str(tmp_path / "ckpt")!r}, keep_last=2)
manager.save(1, {{"w": torch.ones(16)}}, {{"step": 1}}, {{}})
resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))
try:
    manager.save(2, {{"w": torch.ones(2**20)}}, {{"step": 2}}, {{}})
except OSError as e:
    print("ERROR", e)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ERROR cannot write the checkpoint" in r.stdout and "MiB free on its disk" in r.stdout, r.stdout
    assert "the earlier checkpoints are kept" in r.stdout and "Traceback" not in r.stdout
    manager = CheckpointManager(tmp_path / "ckpt")
    assert [p.name for p in manager.folder.iterdir()] == ["step_00000001"]
    tensors = {"w": torch.zeros(16)}
    assert manager.load(manager.latest(), tensors)[0] == {"step": 1} and torch.equal(tensors["w"], torch.ones(16))


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_checkpoint_raises_a_clear_error(tmp_path, damage: str) -> None:
    manager = CheckpointManager(tmp_path, keep_last=1)
    path = manager.save(1, {"w": torch.randn(64, 64)}, {"step": 1}, {})
    shard = next(path.glob("*.distcp"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a checkpoint at all")
    with pytest.raises(RuntimeError, match="corrupt or incomplete"):
        manager.load(path, {"w": torch.zeros(64, 64)})



@pytest.mark.parametrize("part", [".metadata", "optimizer entry", "rank file"])
def test_a_training_checkpoint_that_would_run_code_is_refused(tmp_path, runs_code, part: str) -> None:
    """Torch unpickles a DCP ``.metadata`` and its non-tensor entries (an optimizer's ``lr``) without restriction, and
    ``rank_0.pt`` held the NumPy RNG state: a checkpoint copied in from elsewhere could run code in ``validate``,
    ``export``, ``--init_from`` or a resume. Each part is now refused, and nothing runs."""
    import pickle

    from starflow.checkpoint import CheckpointError
    from starflow.train.state import dcp_metadata, rng_state

    payload, marker = runs_code
    manager = CheckpointManager(tmp_path / "c", keep_last=1)
    group = {"lr": payload if part == "optimizer entry" else 0.1}
    local = {"rng": payload if part == "rank file" else rng_state()}
    path = manager.save(1, {"w": torch.ones(2), "group": group}, {"step": 1}, local)
    if part == ".metadata":
        metadata = path / ".metadata"
        metadata.write_bytes(pickle.dumps([payload, pickle.loads(metadata.read_bytes())]))
        with pytest.raises(CheckpointError, match=r"refused: its \.metadata names posix\.system, which loading could"):
            dcp_metadata(path)
    refused = {".metadata": r"its \.metadata names posix\.system",
               "optimizer entry": "its entry group.lr names posix.system",
               "rank file": "rank_0.pt names posix.system"}[part]
    with pytest.raises(CheckpointError, match=rf"c/step_00000001 is refused: {refused}.*run as code"):
        manager.load(path, {"w": torch.zeros(2), "group": {"lr": 0.0}})
    assert not marker.exists()
    if part == "rank file":
        with pytest.raises(CheckpointError, match="rank_0.pt names posix.system"):
            manager.load_local(path, 0)
    assert not marker.exists()


def test_a_damaged_rank_file_or_entry_is_damage_and_older_numpy_and_python_names_load(tmp_path) -> None:
    """Garbage where a pickle should be is a damaged checkpoint (use an earlier one), not a hostile one; a rank file
    written under NumPy 1 (numpy.core) and a .metadata written by Python 3.13 (pathlib._local) load."""
    from starflow.checkpoint import CheckpointError
    from starflow.train.state import rng_state

    manager = CheckpointManager(tmp_path / "c", keep_last=1)
    path = manager.save(1, {"w": torch.ones(2)}, {"step": 1}, {"rng": rng_state()})
    rank = path / "rank_0.pt"
    torch.save({"rng": rng_state()}, rank, _use_new_zipfile_serialization=False)  # (its pickle as it is: protocol 2)
    data = rank.read_bytes()
    assert b"cnumpy._core.multiarray\n_reconstruct\n" in data
    rank.write_bytes(data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))  # as NumPy 1 names it
    metadata = path / ".metadata"
    assert b"\x8c\x07pathlib" in metadata.read_bytes()
    metadata.write_bytes(metadata.read_bytes().replace(b"\x8c\x07pathlib", b"\x8c\x0epathlib._local"))
    meta, local = manager.load(path, {"w": torch.zeros(2)})
    assert meta == {"step": 1} and local["rng"]["numpy"][1].dtype == np.uint32
    rank.write_bytes(b"\x80\x02garbage, not a pickle")
    with pytest.raises(CheckpointError, match="step_00000001 is corrupt or incomplete .*use an earlier step folder"):
        manager.load(path, {"w": torch.zeros(2)})


def test_an_emptied_checkpoint_meta_file_is_named(tmp_path) -> None:
    from starflow.train.state import read_meta

    path = CheckpointManager(tmp_path, keep_last=1).save(1, {"w": torch.ones(2)}, {"step": 1}, {})
    (path / "trainer.json").write_text("")  # (a copy to a full disk)
    with pytest.raises(ValueError, match=r"step_00000001 is corrupt or incomplete \(trainer.json is not JSON.*earlier"):
        read_meta(path)
    for damaged in ("[1]", '{"step": "two"}', '{"step": 1, "config": []}'):  # (edited by hand)
        (path / "trainer.json").write_text(damaged)
        with pytest.raises(ValueError, match=r"\(trainer.json is not an object with a step count\): use an earlier"):
            read_meta(path)
    (path / "trainer.json").write_text('{"step": 1}')
    from starflow.checkpoint import CheckpointError
    from starflow.train.state import TRAINING_META

    with pytest.raises(CheckpointError, match=r"\(trainer.json is not an object with a step count and config, "
                                              r"schedule, world_size, skipped_updates\): use an earlier step folder"):
        CheckpointManager(tmp_path, required_meta=TRAINING_META).load(path, {"w": torch.zeros(2)})


# ---------------------------------------------------------------------- dry run
def test_dry_run_runs_one_step_and_writes_nothing(tiny_config, digits, config_file, tmp_path, capsys) -> None:
    logdir = tmp_path / "dry"
    assert main(train_args(config_file(tiny_config), digits["train"], logdir, "--dry_run")) == 0
    out = capsys.readouterr().out
    assert "dry run OK" in out and "loss" in out and "bits/dim" in out
    assert not (logdir / "checkpoints").exists()
    assert not (logdir / "model").exists()
    assert not (logdir / "metrics.jsonl").exists()


# ---------------------------------------------------------------------- skipped updates
def test_non_finite_loss_skips_the_update(tiny_config, digits, tmp_path, monkeypatch) -> None:
    config = dict(tiny_config, data=str(digits["train"]), steps=3, save_freq=3, drop_label=0.0)
    trainer = build_trainer(config, tmp_path / "nan")
    good = collate([trainer.dataset[i] for i in range(trainer.cfg.batch_size)])
    bad = dict(good, pixels=torch.full_like(good["pixels"], float("nan")))
    around_bad: list[tuple[dict, dict, int]] = []

    def batches() -> Iterator[dict[str, Any]]:
        yield good
        before = snapshot(trainer.model)
        adam_steps = [s["step"].item() for s in trainer.optimizer.state.values()]
        yield bad
        # resumed when step 3 asks for its batch: step 2 (the NaN one) is done
        around_bad.append((before, snapshot(trainer.model), adam_steps,
                           [s["step"].item() for s in trainer.optimizer.state.values()]))
        yield good

    monkeypatch.setattr(trainer, "_batches", batches)
    history = trainer.fit()

    assert [m["skipped"] for m in history] == [0.0, 1.0, 0.0]
    assert not math.isfinite(history[1]["loss"])
    assert trainer.skipped_updates == 1 and trainer.step == 3
    before, after, adam_before, adam_after = around_bad[0]
    assert same_state(before, after), "a non-finite step changed the weights"
    assert adam_before == adam_after, "a non-finite step advanced AdamW"
    assert not same_state(after, snapshot(trainer.model)), "the next finite step did not update"
    assert read_checkpoint(trainer.checkpoints.latest(), tmp_path)["meta"]["skipped_updates"] == 1


def test_too_many_non_finite_steps_stop_without_pushing_out_the_checkpoint_from_before(tiny_config, digits, tmp_path,
                                                                                      monkeypatch) -> None:
    """The stop writes no checkpoint (the weights may be wrecked by the update before the bad steps) and the loop
    writes none while bad steps last, so the latest checkpoint, which the message names and a rerun resumes from, is
    from before them; the last bad step is logged; a resume starts its count afresh."""
    config = dict(tiny_config, data=str(digits["train"]), steps=20, save_freq=3, keep_last=1, drop_label=0.0,
                  max_nonfinite=3, log_freq=1)
    trainer = build_trainer(config, tmp_path / "diverged")
    good = collate([trainer.dataset[i] for i in range(trainer.cfg.batch_size)])
    bad = dict(good, pixels=torch.full_like(good["pixels"], float("inf")))
    monkeypatch.setattr(trainer, "_batches", lambda: iter([good, bad, good, bad, bad, bad, good]))
    with pytest.raises(TrainingDiverged, match=r"3 consecutive steps \(steps 4 to 6\) .* non-finite.*without a "
                                               r"checkpoint.*resumes from .*step_00000003, from before them"):
        trainer.fit()
    assert trainer.step == 6 and trainer.skipped_updates == 4  # the isolated bad step did not count
    assert [p.name for p in trainer.checkpoints.checkpoints()] == ["step_00000003"]  # none at step 6 (a bad one)
    assert [m["step"] for m in read_metrics(tmp_path / "diverged")] == [1, 2, 3, 4, 5, 6]
    resumed = build_trainer(config, tmp_path / "diverged")
    assert resumed.resume() and resumed.step == 3 and resumed.nonfinite_in_a_row == 0
    ended = build_trainer(dict(config, steps=6, max_nonfinite=5), tmp_path / "ended")  # the run ends in bad steps
    monkeypatch.setattr(ended, "_batches", lambda: iter([good, good, good, bad, bad, bad]))
    ended.fit()
    assert [p.name for p in ended.checkpoints.checkpoints()] == ["step_00000003"]  # not pushed out at the last step


def test_a_run_diverging_at_its_first_step_keeps_its_logdir_and_starts_again(tiny_config, digits, tmp_path,
                                                                             monkeypatch) -> None:
    config = dict(tiny_config, data=str(digits["train"]), steps=20, save_freq=100, drop_label=0.0, max_nonfinite=1)
    trainer = build_trainer(config, tmp_path / "diverged")
    good = collate([trainer.dataset[i] for i in range(trainer.cfg.batch_size)])
    bad = dict(good, pixels=torch.full_like(good["pixels"], float("inf")))
    monkeypatch.setattr(trainer, "_batches", lambda: iter([bad, good]))
    with pytest.raises(TrainingDiverged, match="starts again from the initial weights: no checkpoint was written"):
        trainer.fit()
    assert trainer.checkpoints.latest() is None
    assert [m["step"] for m in read_metrics(tmp_path / "diverged")] == [1]  # what happened stays in the logdir


def test_a_diverged_run_records_its_reason_for_torchrun(tiny_config, digits, config_file, tmp_path, monkeypatch,
                                                        capsys) -> None:
    """``starflow train`` ending in non-finite steps exits 3 with one ``error:`` line, which it also records in the
    error file torchrun names (``TORCHELASTIC_ERROR_FILE``), so the launcher's failure summary says why."""
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    config = dict(tiny_config, steps=6, lr=1e12, grad_clip=0.0, max_nonfinite=2)
    assert main(train_args(config_file(config), digits["train"], tmp_path / "run")) == 3
    err = capsys.readouterr().err
    assert "error: 2 consecutive steps" in err and "non-finite" in err
    recorded = json.loads(error_file.read_text())["message"]["message"]
    assert recorded.startswith("error: 2 consecutive steps") and recorded in err


# ---------------------------------------------------------------------- errors
def test_typo_in_yaml_names_the_nearest_key(tiny_config, digits, config_file, tmp_path, capsys) -> None:
    config = dict(tiny_config)
    config["nosie_std"] = config.pop("noise_std")
    code = main(train_args(config_file(config), digits["train"], tmp_path / "typo"))
    assert code == 2
    err = capsys.readouterr().err
    assert "nosie_std" in err and "did you mean 'noise_std'" in err
    assert not (tmp_path / "typo").exists()


def test_bad_value_on_the_command_line_names_the_key(tiny_config, digits, config_file, tmp_path, capsys) -> None:
    code = main(train_args(config_file(tiny_config), digits["train"], tmp_path / "bad", "--noise_std", "abc"))
    assert code == 2
    assert "noise_std" in capsys.readouterr().err


def test_unknown_flag_is_rejected(tiny_config, digits, config_file, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(train_args(config_file(tiny_config), digits["train"], tmp_path / "flag", "--nosie_std", "0.1"))
    assert exc.value.code == 2
    assert "--nosie_std" in capsys.readouterr().err


def test_missing_data_is_a_clear_error(tiny_config, config_file, tmp_path, capsys) -> None:
    config = {k: v for k, v in tiny_config.items() if k != "data"}
    assert main(["train", "--config", str(config_file(config)), "--logdir", str(tmp_path / "nodata"),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--data" in err and "metadata.jsonl" in err


def test_missing_config_file_returns_2(tmp_path, capsys) -> None:
    assert main(["train", "--config", str(tmp_path / "nope.yaml"), "--data", str(tmp_path)]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_blocks_key_follows_layers_per_block(tiny_config, digits, config_file, tmp_path) -> None:
    """``layers_per_block: 1 1 2`` without ``blocks`` trains, and the saved configs reload (regression)."""
    assert "blocks" not in tiny_config
    logdir = tmp_path / "run"
    assert main(train_args(config_file(dict(tiny_config, steps=1)), digits["train"], logdir)) == 0
    for saved in (logdir / "config.yaml", logdir / "model" / "config.yaml"):
        cfg = load_config(saved)
        assert cfg.layers_per_block == [1, 1, 2] and cfg.num_blocks == 3 and cfg.blocks == 3


def test_template_tags_past_txt_size_are_cut_silently_in_training(tiny_config, digits, config_file, tmp_path,
                                                                  recwarn) -> None:
    """Captions that fit txt_size, whose template tags (the aspect ratio) run past it: truncated without a warning,
    as in sampling (a warning per step would bury the run's log)."""
    config = config_file(dict(tiny_config, mix_aspect=1, steps=2, save_freq=2))
    assert main(train_args(config, digits["train"], tmp_path / "run")) == 0
    assert not [w for w in recwarn if "truncated" in str(w.message)]


def test_plot_metrics_reads_a_run_being_written(resume_runs, tmp_path) -> None:
    """scripts/plot_metrics.py takes a logdir or its metrics.jsonl, skips the line a running training is writing,
    and names a missing file in one line."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "plot_metrics.py"
    partial = tmp_path / "metrics.jsonl"
    partial.write_text((resume_runs["straight"] / "metrics.jsonl").read_text() + '{"step": 7, "lo')
    for source in (resume_runs["straight"], partial):
        r = subprocess.run([sys.executable, str(script), str(source), "--out", str(tmp_path / "curve.png")],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "(6 points)" in r.stdout, r.stderr[-500:]
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "none.jsonl")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "none.jsonl: no such file" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("workers, group", [(0, False), (2, True)], ids=["process", "group_with_workers"])
def test_sigterm_stops_after_the_step_with_a_checkpoint_and_the_rerun_resumes(tiny_config, digits, config_file,
                                                                             tmp_path, workers, group) -> None:
    """A scheduler's SIGTERM (preemption, a time limit) ends the step in progress, writes its checkpoint and exits
    143; the same command resumes from that step, so nothing trained is lost. Sent to the whole process group (as
    Slurm and torchrun do), it reaches the DataLoader workers too, which leave it to the training process."""
    import os
    import re
    import signal
    import subprocess
    import sys

    config = config_file(dict(tiny_config, steps=100_000, save_freq=100_000, log_freq=1, sample_freq=0,
                              num_workers=workers))
    logdir = tmp_path / "run"
    argv = [sys.executable, "-m", "starflow.cli", *train_args(config, digits["train"], logdir)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=group)
    try:
        deadline = time.monotonic() + 120
        while not (logdir / "metrics.jsonl").is_file() or len((logdir / "metrics.jsonl").read_text().splitlines()) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        if group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    step = int(re.search(r"stopped by SIGTERM at step (\d+), after writing its checkpoint: rerun the same command", err)[1])
    assert step >= 3 and (logdir / "checkpoints" / f"step_{step:08d}").is_dir()
    done = subprocess.run(argv[:-2] + ["--steps", str(step + 1), "--device", "cpu"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"at step {step}" in done.stdout and [m["step"] for m in read_metrics(logdir)] == list(range(1, step + 2))


def test_a_data_error_in_a_worker_ends_the_run_with_one_line(tiny_config, config_file, tmp_path) -> None:
    """An error raised in a DataLoader worker (here: every image unreadable) ends the command with exit 2 and the
    error's own line, not torch's worker traceback, and the workers (which leave SIGTERM to the trainer) do not hold
    the exit."""
    import os
    import subprocess
    import sys

    data = tmp_path / "bad"
    data.mkdir()
    for i in range(8):
        (data / f"{i}.png").write_text("not an image")
    (data / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": f"{i}.png", "text": "x"}) for i in range(8)))
    config = config_file(dict(tiny_config, num_workers=2))
    argv = [sys.executable, "-m", "starflow.cli", *train_args(config, data, tmp_path / "run")]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.rstrip().splitlines()[-1].startswith(f"error: every image in {data} is unreadable: ")
    assert "Original Traceback" not in r.stderr


def test_an_unreadable_image_is_said_once_over_epochs_of_new_workers(tiny_config, digits, config_file, tmp_path) -> None:
    """Each epoch starts new DataLoader workers; a file found unreadable is skipped by them without being said again,
    and the metadata.jsonl of a Windows editor (a UTF-8 byte-order mark) reads."""
    import os
    import subprocess
    import sys

    data = tmp_path / "data"
    shutil.copytree(digits["train"], data)
    lines = (data / "metadata.jsonl").read_text().splitlines()
    (data / json.loads(lines[0])["file_name"]).write_text("not an image")
    (data / "metadata.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(lines[:16]).encode())
    config = config_file(dict(tiny_config, num_workers=1, steps=6, save_freq=6, batch_size=8))  # 3 epochs of 2 steps
    argv = [sys.executable, "-m", "starflow.cli", *train_args(config, data, tmp_path / "run")]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.count("skipping unreadable image") == 1, r.stderr[-3000:]


def test_long_runs_keep_bounded_metrics_and_gather_skipped_names_only_when_new(tiny_config, digits, tmp_path,
                                                                             monkeypatch) -> None:
    """fit keeps the last HISTORY_STEPS steps' metrics (metrics.jsonl has them all), and under torchrun the skipped
    file names (a folder's missing files can be millions) are gathered only when some rank met a new one."""
    from types import SimpleNamespace

    import starflow.train.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "HISTORY_STEPS", 2)
    with torch.random.fork_rng(devices=[]):
        history = build_trainer(dict(tiny_config, data=str(digits["train"]), steps=4, save_freq=4), tmp_path / "r").fit()
    assert [m["step"] for m in history] == [3, 4] and len(read_metrics(tmp_path / "r")) == 4
    gathered = []

    def all_gather_object(out, names):  # this rank's names, and another rank's
        gathered.append(len(names))
        out[0], out[1] = set(names), {"other/0.png"}

    monkeypatch.setattr(torch.distributed, "all_reduce", lambda flag, op: None)  # (this rank's flag decides)
    monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)
    rank = SimpleNamespace(dist=SimpleNamespace(distributed=True, world_size=2, device=torch.device("cpu")),
                           skipped_files={"a.png"}, _skipped_seen=-1, _skipped_total=0)
    assert Trainer.skipped_images(rank) == 2 and gathered == [1]
    assert Trainer.skipped_images(rank) == 2 and gathered == [1]  # nothing new on any rank: no gather
    rank.skipped_files.add("b.png")
    assert Trainer.skipped_images(rank) == 3 and gathered == [1, 2]


def test_an_error_in_fit_stops_the_data_workers_while_its_traceback_lives(tiny_config, digits, tmp_path,
                                                                           monkeypatch) -> None:
    """The workers leave SIGTERM to the trainer, so Python's exit (which stops leftover workers with SIGTERM) would
    wait for them: fit stops them itself when it ends, even while the error's traceback keeps its frames alive."""
    import multiprocessing

    trainer = build_trainer(dict(tiny_config, data=str(digits["train"]), num_workers=2, save_freq=2), tmp_path / "r")

    def save() -> None:
        raise OSError("disk full")

    monkeypatch.setattr(trainer, "save", save)
    with pytest.raises(OSError, match="disk full") as caught:
        trainer.fit()
    assert caught.value.__traceback__ is not None  # (held here, with fit's frames)
    assert multiprocessing.active_children() == []


def test_stop_signals_repeated_sigterm_is_one_request_and_ctrl_c_stops_at_once() -> None:
    import os
    import signal

    from starflow.signals import StopSignals

    stop = StopSignals(verbose=False)
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # (a scheduler's, and torchrun's passed on)
        assert stop.received == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) is not stop._handle


_WORKER_SIGNALS_PROBE = """
import json, logging, signal
import torch
from starflow.console import log_lines
from starflow.train.trainer import _worker_batches

def blocked():
    return sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))

class Probe(torch.utils.data.Dataset):
    def __init__(self):
        self.started_with = None
    def __setstate__(self, state):  # unpickled in the worker: before its worker_init_fn, after seconds of imports
        self.__dict__.update(state, started_with=blocked())
    def __len__(self):
        return 1
    def __getitem__(self, i):
        logging.getLogger("starflow.data.probe").warning("said in the worker")
        return {"started_with": self.started_with, "then": blocked(),
                "handlers": [int(signal.getsignal(signal.SIGTERM)), int(signal.getsignal(signal.SIGINT))]}

if __name__ == "__main__":
    with log_lines(), _worker_batches(Probe(), 1, batch_size=None, multiprocessing_context="spawn") as batches:
        print(json.dumps(next(batches)))
    print(json.dumps(blocked()))
"""


def test_data_workers_start_with_stop_signals_held_then_leave_them_to_the_trainer(tmp_path) -> None:
    """A worker started by spawn (macOS; forkserver on Linux from Python 3.14) imports for seconds before its
    ``worker_init_fn`` runs: a signal to the process group then killed it, and the run hung or ended without a
    checkpoint. Workers now start with SIGTERM and SIGINT held, and ignore them once set up; the training process
    holds nothing afterwards. The worker's log records are the command's warning lines."""
    import os
    import signal
    import subprocess
    import sys

    (tmp_path / "probe.py").write_text(_WORKER_SIGNALS_PROBE)
    r = subprocess.run([sys.executable, str(tmp_path / "probe.py")], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    worker, trainer = map(json.loads, r.stdout.splitlines())
    held = [int(signal.SIGINT), int(signal.SIGTERM)]
    assert set(held) <= set(worker["started_with"]) and not set(held) & set(worker["then"])
    assert worker["handlers"] == [int(signal.SIG_IGN)] * 2
    assert not set(held) & set(trainer)
    assert "\nwarning: said in the worker\n" in r.stderr
