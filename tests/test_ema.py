"""EMA of the weights (config ``ema``, ``ema_start``): the average, its exact resume, export and sampling."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from starflow.cli import main
from starflow.config import load_config
from starflow.distributed import init_distributed
from starflow.sampling.pipeline import Pipeline
from starflow.train import launch

pytestmark = pytest.mark.usefixtures("one_thread")

DECAY, START = 0.8, 2


def trainer_for(tiny_config, digits, logdir: Path, **extra):
    config = dict(dict(tiny_config, data=str(digits["train"]), ema=DECAY, ema_start=START, steps=6, save_freq=3,
                       lr=1e-2), **extra)
    return launch.build_trainer(load_config(config, {"logdir": str(logdir)}), init_distributed("cpu"))


def test_ema_is_the_hand_computed_average(tiny_config, digits, tmp_path) -> None:
    trainer = trainer_for(tiny_config, digits, tmp_path)
    data = trainer._batches()
    expected = {k: p.detach().clone() for k, p in trainer.model.named_parameters()}
    for step in range(1, 6):
        trainer.train_step([next(data)])
        for k, p in trainer.model.named_parameters():
            w = p.detach()
            expected[k] = w.clone() if step <= START else DECAY * expected[k] + (1 - DECAY) * w
    moved = 0
    for k, p in trainer.model.named_parameters():
        assert torch.allclose(trainer.ema.shadow[k], expected[k], atol=1e-6, rtol=1e-5), k
        moved += not torch.allclose(trainer.ema.shadow[k], p.detach(), atol=1e-6)
    assert moved  # after ema_start the average lags the weights


def test_resumed_ema_is_bit_identical(tiny_config, digits, tmp_path) -> None:
    straight = trainer_for(tiny_config, digits, tmp_path / "a")
    straight.fit()
    split = trainer_for(tiny_config, digits, tmp_path / "b")
    split.fit(max_steps=4)  # checkpoints at step 3 and at step 4 (the end of this call)
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_00000004")  # as if killed before saving step 4
    resumed = trainer_for(tiny_config, digits, tmp_path / "b")
    assert resumed.resume() and resumed.step == 3
    resumed.fit()
    for k, e in straight.ema.shadow.items():
        assert torch.equal(resumed.ema.shadow[k], e), k


def test_ema_switched_on_at_a_resume_starts_from_the_resumed_weights(tiny_config, digits, tmp_path, capsys) -> None:
    first = trainer_for(tiny_config, digits, tmp_path, ema=0.0, ema_start=0)
    first.fit(max_steps=3)
    resumed = trainer_for(tiny_config, digits, tmp_path)  # ema DECAY from here on
    assert resumed.resume() and resumed.step == 3
    assert "note: ema 0.8 is new at this resume: the average starts from the weights of step 3" in capsys.readouterr().out
    for k, p in resumed.model.named_parameters():
        assert torch.equal(resumed.ema.shadow[k], p.detach()), k
    resumed.fit()
    assert resumed.step == 6 and any(not torch.equal(resumed.ema.shadow[k], p.detach())
                                     for k, p in resumed.model.named_parameters())
    without = trainer_for(tiny_config, digits, tmp_path, ema=0.0, ema_start=0, steps=7)  # and switched off again
    assert without.resume() and without.step == 6 and without.ema is None


def test_an_export_writes_its_config_after_every_weights_file(tiny_config, digits, tmp_path, monkeypatch) -> None:
    """A folder whose export was killed has no config, so it never loads without its EMA weights."""
    import starflow.sampling.pipeline as pipeline_module

    trainer = trainer_for(tiny_config, digits, tmp_path / "run", steps=1)
    trainer.fit()
    present = []
    write_config = pipeline_module.save_config
    monkeypatch.setattr(pipeline_module, "save_config", lambda cfg, path: (
        present.append(sorted(p.name for p in Path(path).parent.glob("*.safetensors"))), write_config(cfg, path)))
    trainer.export(tmp_path / "model")
    assert present == [["ema.safetensors", "model.safetensors"]]


def test_ema_export_and_sampling(tiny_config, digits, config_file, tmp_path, capsys) -> None:
    config = config_file(dict(tiny_config, data=str(digits["train"]), ema=DECAY, steps=4, save_freq=4, lr=1e-2))
    logdir = tmp_path / "run"
    assert main(["train", "--config", str(config), "--logdir", str(logdir), "--device", "cpu"]) == 0
    folder = logdir / "model"
    ema, weights = load_file(folder / "ema.safetensors"), load_file(folder / "model.safetensors")
    assert ema.keys() == weights.keys() and any(not torch.equal(ema[k], weights[k]) for k in ema)
    assert main(["export", "--ema", str(logdir), str(tmp_path / "ema.safetensors")]) == 0
    exported = load_file(tmp_path / "ema.safetensors")
    assert all(torch.equal(exported[k], ema[k]) for k in ema)
    for flag, out in (([], "plain"), (["--ema"], "ema")):
        assert main(["sample", "--checkpoint_path", str(folder), "--caption", "a handwritten digit 3",
                     "--num_samples", "1", "--output_dir", str(tmp_path / out), "--device", "cpu", *flag]) == 0
    a = (tmp_path / "plain" / "00000_a_handwritten_digit_3.png").read_bytes()
    b = (tmp_path / "ema" / "00000_a_handwritten_digit_3.png").read_bytes()
    assert a != b
    no_ema = tmp_path / "no_ema"
    no_ema.mkdir()
    for name in ("config.yaml", "model.safetensors"):
        (no_ema / name).write_bytes((folder / name).read_bytes())
    assert main(["sample", "--checkpoint_path", str(no_ema), "--caption", "x", "--ema", "--output_dir",
                 str(tmp_path / "x"), "--device", "cpu"]) == 2  # no ema.safetensors: a clear error
    capsys.readouterr()
    for command in ("sample", "generate-set"):  # --ema with a weights file would read the plain weights: refused
        assert main([command, "--checkpoint_path", str(folder / "model.safetensors"), "--caption", "x", "--ema",
                     *(["--output_dir"] if command == "sample" else ["--num_samples", "2", "--out"]), str(tmp_path / "y"),
                     "--device", "cpu"]) == 2
        assert "--ema reads a model folder's ema.safetensors" in capsys.readouterr().err
    with pytest.raises(ValueError, match="ema: .* is a weights file"):
        Pipeline.from_pretrained(folder / "model.safetensors", ema=True)


def test_export_refuses_damage_and_odd_names_and_never_leaves_stale_weights(tiny_config, digits, config_file,
                                                                            tmp_path, capsys) -> None:
    config = config_file(dict(tiny_config, data=str(digits["train"]), ema=DECAY, steps=2, save_freq=1, keep_last=2))
    logdir = tmp_path / "run"
    assert main(["train", "--config", str(config), "--logdir", str(logdir), "--device", "cpu"]) == 0
    folder, step1 = logdir / "model", logdir / "checkpoints" / "step_00000001"
    assert (folder / "ema.safetensors").is_file()
    plain = config_file(dict(tiny_config, data=str(digits["train"]), steps=1), name="plain.yaml")
    assert main(["train", "--config", str(plain), "--logdir", str(tmp_path / "plain"), "--device", "cpu"]) == 0
    # a run without EMA exported over the EMA run's model folder: its ema.safetensors must not survive
    assert main(["export", str(tmp_path / "plain"), str(folder), "--overwrite"]) == 0
    assert sorted(p.name for p in folder.glob("*.safetensors")) == ["model.safetensors"]
    for odd in ("w.ckpt", "w.safetensor", "w.PTH"):
        assert main(["export", str(step1), str(tmp_path / odd)]) == 2
        assert "weights files end in .safetensors, .pth, .pt, .bin" in capsys.readouterr().err
        assert not (tmp_path / odd).exists()
    run_config = (logdir / "config.yaml").read_bytes()
    for src, dst in ((logdir, logdir), (logdir, step1), (step1, logdir), (logdir, logdir / "checkpoints" / "x")):
        assert main(["export", str(src), str(dst), "--overwrite"]) == 2  # (the run's own files would be replaced)
        assert "that is the run or a folder of its checkpoints" in capsys.readouterr().err
    assert (logdir / "config.yaml").read_bytes() == run_config and not (step1 / "model.safetensors").exists()
    for part in (step1, next(step1.glob("*.distcp"))):  # a training checkpoint is exported, not converted
        assert main(["convert", str(part), str(tmp_path / "c.safetensors")]) == 2
        assert f"write its weights with `starflow export {step1} OUT`" in capsys.readouterr().err
    shard = next(step1.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:1000])
    for command in (["export", str(step1), str(tmp_path / "w.pth")],
                    ["train", "--config", str(plain), "--logdir", str(tmp_path / "again"), "--init_from", str(step1),
                     "--device", "cpu", "--dry_run"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert (f"training checkpoint {step1} is corrupt or incomplete (truncated: {shard.name} has 1000 bytes, the "
                "checkpoint's metadata needs") in err
        assert "Traceback" not in err
    # found before any tensor is read: a model given such a step folder to start from is left as it was
    from starflow.train.init_from import init_from
    from starflow.train.state import CheckpointError

    model = Pipeline.from_pretrained(folder).model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="truncated"):
        init_from(model, step1)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_an_export_that_fails_leaves_the_earlier_one_and_files_follow_the_umask(tmp_path) -> None:
    """A model folder exported again over an earlier export: a write that fails part way (a file-size limit here, as
    a full disk or a quota) leaves the earlier export as it was; the files a group shares get the umask's
    permissions, the text encoder's weights too."""
    import os
    import subprocess
    import sys

    from starflow.assets import DEMO_DIR

    folder = tmp_path / "model"
    old = os.umask(0o002)
    try:
        Pipeline.from_pretrained(DEMO_DIR).save_pretrained(folder)
    finally:
        os.umask(old)
    modes = {str(p.relative_to(folder)): p.stat().st_mode & 0o777 for p in folder.rglob("*")}
    assert modes["text_encoder/model.safetensors"] == modes["model.safetensors"] == 0o664
    assert set(modes.values()) <= {0o664, 0o775}, modes
    before = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    script = f"""
import resource, signal, torch
from starflow.sampling.pipeline import Pipeline
pipe = Pipeline.from_pretrained({str(DEMO_DIR)!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 2**20, 16 * 2**20))
try:
    pipe.save_pretrained({str(folder)!r}, extra={{"ema.safetensors": {{"w": torch.ones(8 * 2**20)}}}})
except OSError as e:
    print("ERROR", e)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "ERROR cannot write" in r.stdout and "ema.safetensors" in r.stdout, (r.stdout, r.stderr[-2000:])
    after = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert after == before  # nothing of the failed export, no scratch folder left
    assert Pipeline.from_pretrained(folder).config == Pipeline.from_pretrained(DEMO_DIR).config
