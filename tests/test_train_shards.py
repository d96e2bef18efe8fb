"""Training from webdataset shards (``starflow pack``) and from cached latents (``starflow cache-latents``):
exact resume of the shard position with DataLoader workers, and cached latents train exactly like the shards
they were made from."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from starflow.cli import main
from starflow.train.state import KILL_DURING_SAVE_ENV

pytestmark = pytest.mark.usefixtures("one_thread")


def metrics(logdir: Path) -> dict[int, dict[str, float]]:
    return {m["step"]: m for m in map(json.loads, (logdir / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def shard_runs(tiny_config, digits, tmp_path_factory) -> dict[str, Path]:
    import yaml

    tmp = tmp_path_factory.mktemp("shard_train")
    config = dict(tiny_config, steps=8, save_freq=3, num_workers=2, drop_label=0.3)
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    train = ["train", "--config", str(tmp / "config.yaml"), "--device", "cpu"]
    assert main(["pack", str(digits["train"]), str(tmp / "shards"), "--shard_size", "8"]) == 0
    assert main(["cache-latents", "--config", str(tmp / "config.yaml"), "--data", str(tmp / "shards"),
                 "--out", str(tmp / "cache"), "--shard_size", "8", "--device", "cpu"]) == 0
    with torch.random.fork_rng(devices=[]):
        assert main([*train, "--data", str(tmp / "shards"), "--logdir", str(tmp / "straight")]) == 0
        # killed while saving step 6: the step-3 checkpoint (mid-epoch) is where the next process resumes
        env = dict(os.environ, OMP_NUM_THREADS="1", **{KILL_DURING_SAVE_ENV: "6"})
        r = subprocess.run([sys.executable, "-m", "starflow.cli", *train, "--data", str(tmp / "shards"),
                            "--logdir", str(tmp / "split")], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode != 0 and (tmp / "split" / "checkpoints" / "step_00000003").is_dir(), r.stderr[-2000:]
        assert main([*train, "--data", str(tmp / "shards"), "--logdir", str(tmp / "split")]) == 0
        assert main([*train, "--data", str(tmp / "cache"), "--logdir", str(tmp / "cached")]) == 0
    return {"tmp": tmp, "config": tmp / "config.yaml"}


def test_shard_training_resumes_exactly_with_workers(shard_runs) -> None:
    """Killed at step 6, a new process resumes from the step-3 checkpoint (mid-epoch, 2 workers): the same losses."""
    tmp = shard_runs["tmp"]
    straight, split = metrics(tmp / "straight"), metrics(tmp / "split")
    assert sorted(straight) == sorted(split) == list(range(1, 9))
    for step in straight:
        assert split[step]["loss"] == straight[step]["loss"], step
    assert (tmp / "split" / "model" / "model.safetensors").is_file()
    from starflow.train.state import read_meta

    prompts = [read_meta(tmp / run / "checkpoints" / "step_00000006")["sample_prompts"] for run in ("straight", "split")]
    assert prompts[0] == prompts[1] and len(prompts[0]) > 1  # the grids' prompts: the stream's first, not the resume's


def test_shard_training_resumes_on_another_layout(shard_runs, capsys) -> None:
    """The step-6 checkpoint of 1 rank x 2 workers (both at epoch 1, batch 1: 48 of 32 samples per epoch, 1.5
    epochs) resumed with one worker: epoch 1 with 2 of its 4 batches skipped, so steps 7-10 are epoch 1's last
    two batches and epoch 2's first two."""
    import shutil

    from starflow.train.state import CheckpointManager

    tmp = shard_runs["tmp"]
    logdir = tmp / "relayout"
    shutil.copytree(tmp / "straight", logdir)
    shutil.rmtree(logdir / "checkpoints" / "step_00000008")
    assert main(["train", "--config", str(shard_runs["config"]), "--device", "cpu", "--data", str(tmp / "shards"),
                 "--logdir", str(logdir), "--num_workers", "0", "--steps", "10"]) == 0
    out = capsys.readouterr().out
    assert "saved by 1 rank(s) x 2 worker(s) with micro-batches of 8, this run has 1 x 1 and 8" in out
    assert "at epoch 1 with 2 batch(es) of each worker skipped" in out
    data = CheckpointManager.load_local(logdir / "checkpoints" / "step_00000010", 0)["data"]
    assert data["stream"]["positions"] == {"0": [2, 2]} and data["micro_batch"] == 8
    assert max(metrics(logdir)) == 10


def test_a_run_moved_from_its_folder_to_shards_resumes(shard_runs, digits, capsys) -> None:
    """A run started on the image folder and continued on its packed shards: model, optimizer and step resume,
    the shards start from their beginning, and the log says so."""
    tmp = shard_runs["tmp"]
    base = ["train", "--config", str(shard_runs["config"]), "--device", "cpu", "--logdir", str(tmp / "moved"),
            "--num_workers", "0"]
    assert main([*base, "--data", str(digits["train"]), "--steps", "3"]) == 0
    assert main([*base, "--data", str(tmp / "shards"), "--steps", "5"]) == 0
    out = capsys.readouterr().out
    assert "its data position is for a folder, this run reads shards; the data starts from its beginning" in out
    assert "resumed from" in out and sorted(metrics(tmp / "moved")) == [1, 2, 3, 4, 5]


def test_a_checkpoint_of_the_earlier_split_continues_by_samples(shard_runs, digits, capsys) -> None:
    """One shard, 2 workers: a checkpoint without the stream version (written when fewer shards than slots were
    dealt every S-th sample) is continued by the samples consumed, and says so."""
    tmp = shard_runs["tmp"]
    assert main(["pack", str(digits["train"]), str(tmp / "one_shard"), "--shard_size", "64"]) == 0
    base = ["train", "--config", str(shard_runs["config"]), "--device", "cpu", "--logdir", str(tmp / "legacy"),
            "--data", str(tmp / "one_shard")]
    assert main([*base, "--steps", "3"]) == 0
    rank_file = tmp / "legacy" / "checkpoints" / "step_00000003" / "rank_0.pt"
    local = torch.load(rank_file, weights_only=False)
    del local["data"]["stream_version"]
    torch.save(local, rank_file)
    capsys.readouterr()
    assert main([*base, "--steps", "5"]) == 0
    out = capsys.readouterr().out
    assert "saved by 1 rank(s) x 2 worker(s) with an earlier split of its shards, micro-batches of 8" in out
    assert "resume with the old layout" not in out


def test_cached_latents_train_like_their_shards(shard_runs) -> None:
    tmp = shard_runs["tmp"]
    straight, cached = metrics(tmp / "straight"), metrics(tmp / "cached")
    assert straight and sorted(cached) == sorted(straight)
    for step in straight:
        assert cached[step]["loss"] == pytest.approx(straight[step]["loss"], rel=1e-6), step


def test_cache_with_other_settings_is_refused(shard_runs, capsys) -> None:
    tmp = shard_runs["tmp"]
    code = main(["train", "--config", str(shard_runs["config"]), "--data", str(tmp / "cache"), "--device", "cpu",
                 "--logdir", str(tmp / "wrong"), "--noise_std", "0.3"])
    assert code == 2
    err = capsys.readouterr().err
    assert "noise_std" in err and "cache-latents" in err


def test_wds_with_a_plain_folder_reads_it_and_names_the_packer(tiny_config, digits, config_file, tmp_path,
                                                              capsys) -> None:
    code = main(["train", "--config", str(config_file(dict(tiny_config, wds=1, steps=1))), "--data",
                 str(digits["train"]), "--device", "cpu", "--logdir", str(tmp_path / "run")])
    assert code == 0
    out = capsys.readouterr()
    assert "starflow pack" in out.out + out.err
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_sharded_sample_grids_from_shards_use_rank_0s_prompts(tiny_config, digits, config_file, tmp_path) -> None:
    """FSDP2 on 2 ranks from shards whose first batches hold different captions on each rank (1 and 2 of them): every
    rank samples rank 0's prompts, so the sharded layers see the same calls on every rank (they used to disagree
    and abort the run)."""
    import shutil

    src = tmp_path / "img"
    src.mkdir()
    lines = [json.loads(line) for line in (digits["train"] / "metadata.jsonl").read_text().splitlines()][:16]
    for i, line in enumerate(lines):  # shards of 4: one caption in the first, two alternating in the second
        shutil.copy(digits["train"] / line["file_name"], src / line["file_name"])
        line["text"] = "alpha" if (i // 4) % 2 == 0 else ("beta" if i % 2 else "gamma")
    (src / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["pack", str(src), str(tmp_path / "shards"), "--shard_size", "4"]) == 0
    config = config_file(dict(tiny_config, img_size=16, patch_size=2, steps=1, batch_size=4, num_workers=0,
                              sample_freq=1, fsdp=1))  # 64 tokens: the auto Jacobi chunks depend on the rows
    env = dict(os.environ, TMPDIR=str(tmp_path), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "starflow.cli", "train", "--config", str(config), "--data", str(tmp_path / "shards"),
                        "--logdir", str(tmp_path / "run"), "--device", "cpu"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "run" / "samples" / "step_00000001.png").is_file()
    assert "sample grids every 1 epoch(s) of 4 steps" in r.stdout + r.stderr  # 16 samples in batches of 4
