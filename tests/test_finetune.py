"""Fine-tuning from released or exported weights: ``starflow train --init_from PATH`` (``--resume_path``).

The weights are a perturbed tiny STARFlow (``conftest.TINY_CONFIG``) saved in the official layout; the fine-tune
adds a learnable denoiser, which the file lacks. The first logged loss of a fine-tune must equal the loss of
those weights, loaded with the strict loader, on the same batch: in one process and in two FSDP2 processes.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from starflow.checkpoint import CheckpointError, load_weights, save_weights
from starflow.cli import main
from starflow.config import load_config
from starflow.distributed import init_distributed
from starflow.train import launch
from starflow.train.init_from import init_from, plan_init
from helpers import losses, run_env, train_cmd

STEPS = 3


@pytest.fixture(scope="module")
def weights(make_pipeline, tmp_path_factory) -> Path:
    """A perturbed tiny model without a denoiser, as ``model.safetensors``."""
    path = tmp_path_factory.mktemp("init") / "model.safetensors"
    save_weights(make_pipeline(std=0.3, seed=3).model, path)
    return path


@pytest.fixture(scope="module")
def config(tiny_config, digits, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("init_cfg") / "config.yaml"
    path.write_text(yaml.safe_dump(dict(tiny_config, data=str(digits["train"]), steps=STEPS, save_freq=2,
                                        learnable_self_denoiser=1, fsdp=1, lr=1e-3)))
    return path


def reference_loss(config: Path, weights: Path | None, logdir: Path) -> float:
    """First-step loss of the run's model with ``weights`` put in by the strict loader (denoiser excluded)."""
    trainer = launch.build_trainer(load_config(config, {"logdir": str(logdir)}), init_distributed("cpu"))
    if weights is not None:
        load_weights(trainer.model, weights, strict=False)
    return trainer.train_step([next(trainer._batches())])["loss"]


def test_plan_sorts_names_and_rejects_everything_else() -> None:
    model = {"blocks.0.proj_in.weight": (4, 2), "learnable_self_denoiser.proj_in.weight": (8, 2)}
    report = plan_init(model, {"blocks.0.proj_in.weight": (4, 2), "var": ()}, "w")
    assert list(report.loaded) == ["blocks.0.proj_in.weight"]
    assert list(report.new) == ["learnable_self_denoiser.proj_in.weight"]
    assert list(report.dropped) == ["var"]  # a deprecated buffer
    assert "learnable_self_denoiser" in report.table() and "blocks.0" in report.table()
    with pytest.raises(CheckpointError) as err:
        plan_init(model, {"blocks.0.proj_in.weight": (4, 3), "blocks.9.sos_embed": (1, 1, 2)}, "w")
    assert "blocks.0.proj_in.weight: model [4, 2], checkpoint [4, 3]" in str(err.value)
    assert "blocks.9.sos_embed" in str(err.value)


def test_one_and_two_process_finetunes_start_from_the_weights(config, weights, tmp_path) -> None:
    ref = reference_loss(config, weights, tmp_path / "ref")
    fresh = reference_loss(config, None, tmp_path / "fresh")
    assert abs(ref - fresh) > 1e-2  # the weights change the loss: the comparison below can fail
    outputs = {}
    for name, nproc in (("one", 1), ("two", 2)):
        logdir = tmp_path / name
        r = subprocess.run(train_cmd(config, logdir, nproc, "--init_from", str(weights), "--ema", "0.5"),
                           env=run_env(tmp_path), capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        outputs[name] = r.stdout
        assert losses(logdir)[1]["loss"] == pytest.approx(ref, rel=1e-5), name
    assert "learnable_self_denoiser" in outputs["two"] and "init_from" in outputs["two"]  # the table
    assert "meta device" not in outputs["two"]  # a new denoiser needs its random initialisation
    # without the denoiser every weight comes from the file: built on the meta device, allocated as shards
    r = subprocess.run(train_cmd(config, tmp_path / "meta", 2, "--init_from", str(weights), "--learnable_self_denoiser",
                                 "0", "--steps", "1"), env=run_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "built on the meta device" in r.stdout
    assert losses(tmp_path / "meta")[1]["loss"] == pytest.approx(ref, rel=1e-5)
    # the EMA (sharded like the weights under FSDP2) starts from the loaded weights and matches one process
    ema = {n: load_file(tmp_path / n / "model" / "ema.safetensors") for n in ("one", "two")}
    start = load_file(weights)
    for k, v in ema["one"].items():
        assert torch.allclose(ema["two"][k], v, atol=1e-4), k  # as the weights themselves (Adam, 3 steps)
    moved = [k for k in start if not torch.allclose(ema["one"][k], start[k], atol=1e-6)]
    assert moved and all(k in ema["one"] for k in start)
    # a restart of the same run resumes from its own checkpoint, not from --init_from
    longer = tmp_path / "longer.yaml"
    longer.write_text(yaml.safe_dump(dict(yaml.safe_load(config.read_text()), steps=STEPS + 2)))
    r = subprocess.run(train_cmd(longer, tmp_path / "two", 2, "--resume_path", str(weights)), env=run_env(tmp_path),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout + r.stderr and "\ninit_from" not in r.stdout  # (no init_from table)
    assert "is not loaded: the run resumes from its own checkpoint" in r.stdout
    assert sorted(losses(tmp_path / "two")) == list(range(1, STEPS + 3))


def test_fit_loads_init_from_for_a_trainer_built_in_python(config, weights, tmp_path) -> None:
    """build_trainer + fit, as a notebook would, with every weight from init_from (the meta-device build): fit
    loads the weights itself, as the CLI run does; unloaded, the run would train on uninitialised memory."""
    no_denoiser = {"learnable_self_denoiser": 0}
    ref = launch.build_trainer(load_config(config, {"logdir": str(tmp_path / "ref"), **no_denoiser}),
                               init_distributed("cpu"))
    load_weights(ref.model, weights)
    first = ref.train_step([next(ref._batches())])["loss"]
    cfg = load_config(config, {"logdir": str(tmp_path / "py"), "init_from": str(weights), "steps": 1, **no_denoiser})
    trainer = launch.build_trainer(cfg, init_distributed("cpu"))
    assert trainer.init_pending
    trainer.fit()
    assert not trainer.init_pending
    assert losses(tmp_path / "py")[1]["loss"] == pytest.approx(first, rel=1e-5)


def test_init_from_a_training_checkpoint_folder(config, weights, tmp_path) -> None:
    """A DCP step folder is a source too; a mismatched config is an error and leaves the model untouched."""
    logdir = tmp_path / "run"
    assert main(["train", "--config", str(config), "--logdir", str(logdir), "--device", "cpu", "--init_from",
                 str(weights)]) == 0
    step = logdir / "checkpoints" / f"step_{STEPS:08d}"
    trainer = launch.build_trainer(load_config(config, {"logdir": str(tmp_path / "b")}), init_distributed("cpu"))
    report = init_from(trainer.model, step)
    assert not report.new and "step 3" in report.source
    final = load_file(logdir / "model" / "model.safetensors")
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, final[k]), k
    wide = load_config(config, {"logdir": str(tmp_path / "c"), "channels": 64})
    other = launch.build_trainer(wide, init_distributed("cpu"))
    before = {k: v.clone() for k, v in other.model.state_dict().items()}
    with pytest.raises(CheckpointError, match="mismatched"):
        init_from(other.model, weights)
    assert all(torch.equal(before[k], v) for k, v in other.model.state_dict().items())


def test_a_finetune_refuses_a_tiny_t5_other_than_its_bases(digits, tmp_path, capsys) -> None:
    """The built-in tiny T5 is drawn from the run's seed: a fine-tune of the shipped digits model with another seed
    would train its flow on other text features. It is refused, with the flag that uses the base's encoder."""
    from starflow.assets import DEMO_DIR

    repo = Path(__file__).resolve().parents[1]
    train = ["train", "--config", str(repo / "configs" / "demo_digits.yaml"), "--data", str(digits["train"]),
             "--init_from", str(DEMO_DIR), "--logdir", str(tmp_path / "run"), "--device", "cpu", "--dry_run",
             "--batch_size", "8"]
    assert main([*train, "--seed", "3"]) == 2
    assert (f"this run's built-in tiny T5 (drawn from seed 3) is another one: pass --text {DEMO_DIR / 'text_encoder'}"
            in capsys.readouterr().err)
    assert main([*train, "--seed", "3", "--text", str(DEMO_DIR / "text_encoder")]) == 0
    assert main(train) == 0  # the seed the base was trained with: the same encoder


def test_a_lora_run_refuses_weights_without_the_denoiser_it_would_freeze(config, weights, tmp_path, capsys) -> None:
    """A LoRA run trains only its adapters: a learnable denoiser the init_from weights lack would keep its fresh
    initialisation, and sampling would use it. Refused, with the ways out; without LoRA the denoiser trains."""
    args = ["train", "--config", str(config), "--logdir", str(tmp_path / "lora"), "--device", "cpu", "--init_from",
            str(weights), "--lora_rank", "2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert (f"--init_from {weights} has no learnable_self_denoiser weights (" in err
            and "train without LoRA (lora_rank 0), or turn learnable_self_denoiser off (--learnable_self_denoiser 0)"
            in err)
    assert main([*args, "--learnable_self_denoiser", "0", "--steps", "1"]) == 0
