"""``torchrun --nproc_per_node 2 starflow sample``: captions split across ranks, outputs in caption order, the
same images as one process for the same seeds, with the weights replicated and sharded with FSDP2 (gloo)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from starflow.assets import DEMO_DIR
from starflow.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = [f"a handwritten digit {d}" for d in (3, 1, 4, 1, 5, 9, 2)]  # 7: the ranks get 4 and 3


def run_sample(out: Path, *extra: str) -> list[str]:
    return ["sample", "--checkpoint_path", str(DEMO_DIR), "--caption_file", str(out.parent / "captions.txt"),
            "--output_dir", str(out), "--device", "cpu", "--sample_batch_size", "2", "--cfg", "2.0", *extra]


def torchrun(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, TMPDIR=str(tmp), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "starflow.cli", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def pngs(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("0*.png"))}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist_sample")
    (root / "captions.txt").write_text("\n".join(CAPTIONS) + "\n")
    out = root / "one"
    assert main(run_sample(out)) == 0
    return out


@pytest.mark.parametrize("fsdp", ["0", "1"])
def test_two_processes_give_the_same_images_in_caption_order(one_process: Path, fsdp: str, tmp_path: Path) -> None:
    out = one_process.parent / f"two_fsdp{fsdp}"
    r = torchrun(run_sample(out, "--fsdp", fsdp), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    if fsdp == "1":
        assert "sharded over 2 ranks" in r.stdout
    single, double = pngs(one_process), pngs(out)
    assert list(single) == list(double) == [f"{i:05d}_{c.replace(' ', '_')}.png" for i, c in enumerate(CAPTIONS)]
    for name in single:
        np.testing.assert_array_equal(single[name], double[name], err_msg=name)
    assert (out / "grid.png").is_file()


def test_sharded_bf16_weights_give_the_one_process_bf16_images(tmp_path: Path) -> None:
    """The shards are converted to bf16 as they are filled (no rank converts the whole model first): the
    same images as one process with bf16 weights."""
    (tmp_path / "captions.txt").write_text("a handwritten digit 3\na handwritten digit 5\n")
    assert main(run_sample(tmp_path / "one", "--bf16")) == 0
    r = torchrun(run_sample(tmp_path / "two", "--bf16", "--fsdp", "1"), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sharded over 2 ranks" in r.stdout
    single, double = pngs(tmp_path / "one"), pngs(tmp_path / "two")
    assert len(single) == 2 and list(single) == list(double)
    for name in single:
        np.testing.assert_array_equal(single[name], double[name], err_msg=name)


LOAD_SHARDED = """
import sys, torch, torch.distributed as dist
from pathlib import Path
from safetensors.torch import load_file
from starflow.assets import DEMO_DIR
from starflow.config import load_config
from starflow.distributed import load_sharded
from starflow.models import STARFlow
dist.init_process_group("gloo")
cfg = load_config(DEMO_DIR / "config.yaml", {"channels": 64})  # 64 rows over 3 ranks: 22, 22, 20
torch.manual_seed(0)
if dist.get_rank() == 0:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in STARFlow.from_config(cfg, txt_dim=32).state_dict().items()}, sys.argv[1])
dist.barrier()
with torch.device("meta"):
    model = STARFlow.from_config(cfg, txt_dim=32)
load_sharded(model, sys.argv[1], torch.device("cpu"), torch.bfloat16)
want = load_file(sys.argv[1])
got = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
uneven = sum(v.to_local().shape != v.shape and v.shape[0] % 3 != 0 for v in model.state_dict().values() if hasattr(v, "to_local"))
same = all(torch.equal(got[k], w.to(got[k].dtype)) and got[k].dtype == (torch.bfloat16 if w.is_floating_point() else w.dtype) for k, w in want.items())
(Path(sys.argv[1]).parent / f"rank_{dist.get_rank()}.txt").write_text(f"{same} {uneven > 0}")
dist.destroy_process_group()
"""


def test_sharded_loading_copies_each_ranks_slices(tmp_path: Path) -> None:
    """``load_sharded`` on 3 ranks (uneven shards): each rank copies its own slices of the file, converted to
    bf16, and the gathered parameters are the file's values."""
    (tmp_path / "script.py").write_text(LOAD_SHARDED)
    env = dict(os.environ, TMPDIR=str(tmp_path), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3",
                        str(tmp_path / "script.py"), str(tmp_path / "w.safetensors")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [(tmp_path / f"rank_{rank}.txt").read_text() for rank in range(3)] == ["True True"] * 3


def test_per_sample_stopping_is_what_makes_ranks_agree(one_process: Path, tmp_path: Path) -> None:
    """The official whole-batch stopping rule depends on which samples share a batch: a smaller batch
    changes the images (this is why per-sample stopping is the default). With a fixed block size (the default
    'auto' chooses it for --sample_batch_size) per-sample stopping gives the same images at any batch size."""
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    (tmp_path / "captions.txt").write_text((one_process.parent / "captions.txt").read_text())
    base = ["sample", "--checkpoint_path", str(DEMO_DIR), "--caption_file", str(tmp_path / "captions.txt"),
            "--device", "cpu", "--cfg", "2.0", "--jacobi_block_size", "64", "--jacobi_stop", "batch"]
    assert main(base + ["--output_dir", str(out_a), "--sample_batch_size", "7"]) == 0
    assert main(base + ["--output_dir", str(out_b), "--sample_batch_size", "1"]) == 0
    a, b = pngs(out_a), pngs(out_b)
    assert any(not np.array_equal(a[k], b[k]) for k in a)
    c, d = tmp_path / "c", tmp_path / "d"
    assert main(base[:-2] + ["--output_dir", str(c), "--sample_batch_size", "7"]) == 0
    assert main(base[:-2] + ["--output_dir", str(d), "--sample_batch_size", "1"]) == 0
    c_images, d_images = pngs(c), pngs(d)
    assert c_images and c_images.keys() == d_images.keys()
    assert all(np.array_equal(c_images[k], d_images[k]) for k in c_images)


def test_a_single_caption_counts_as_the_official_script(tmp_path: Path) -> None:
    """One ``--caption``: ``sample_batch_size`` images per process (4, and 8 on 2 processes), unless
    ``--num_samples`` says otherwise; a caption file: one image per line (times ``--num_samples``)."""
    base = ["sample", "--checkpoint_path", str(DEMO_DIR), "--caption", "a handwritten digit 7", "--device", "cpu",
            "--sample_batch_size", "4"]
    assert main(base + ["--output_dir", str(tmp_path / "one")]) == 0
    assert len(pngs(tmp_path / "one")) == 4
    r = torchrun(base + ["--output_dir", str(tmp_path / "two")], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    two = pngs(tmp_path / "two")
    assert len(two) == 8
    for name, image in pngs(tmp_path / "one").items():  # seeds follow the global index
        np.testing.assert_array_equal(two[name], image)
    assert main(base + ["--num_samples", "3", "--output_dir", str(tmp_path / "three")]) == 0
    assert len(pngs(tmp_path / "three")) == 3
    (tmp_path / "captions.txt").write_text("a handwritten digit 1\na handwritten digit 2\n")
    files = ["sample", "--checkpoint_path", str(DEMO_DIR), "--caption_file", str(tmp_path / "captions.txt"),
             "--device", "cpu", "--sample_batch_size", "4"]
    assert main(files + ["--output_dir", str(tmp_path / "file")]) == 0
    assert len(pngs(tmp_path / "file")) == 2
    assert main(files + ["--num_samples", "2", "--output_dir", str(tmp_path / "file2")]) == 0
    assert len(pngs(tmp_path / "file2")) == 4
    assert main(base + ["--num_samples", "0", "--output_dir", str(tmp_path / "zero")]) == 2


def test_rank_zero_progress_counts_every_rank(tmp_path, monkeypatch) -> None:
    """The bar of rank 0 of 2 counts the samples both ranks make (5 here, 3 of them rank 0's)."""
    import torch

    import starflow.sampling.batch as batch_module
    from starflow.distributed import DistInfo
    from starflow.sampling.pipeline import Pipeline, SampleSettings

    bars = []

    class Bar:
        def __init__(self, total, **kwargs):
            self.total, self.count = total, 0
            bars.append(self)

        def update(self, n):
            self.count += n

        def close(self):
            pass

    monkeypatch.setattr(batch_module, "tqdm", Bar)
    monkeypatch.setattr(torch.distributed, "barrier", lambda: None)  # (no process group in this one process)
    pipe = Pipeline.from_pretrained(DEMO_DIR)
    captions = [f"a handwritten digit {d}" for d in range(5)]
    batch_module.write_samples(pipe, captions, SampleSettings(), tmp_path, seed=0, batch_size=2,
                               dist=DistInfo(0, 2, 0, torch.device("cpu")))
    assert len(list(tmp_path.glob("*.png"))) == 3  # this rank's share: samples 0, 2 and 4
    assert [(b.total, b.count) for b in bars] == [(5, 5)]


def test_generate_set_decodes_a_sample_alike_in_any_batch(monkeypatch, tmp_path) -> None:
    """generate-set pads every batch to its full size (repeats, not written): sample 8 of a set then decodes
    identically as the lone sample of a short last batch and inside a full batch, so a set does not depend on the
    number of ranks or on what a resumed run still lacks. (Matrix products round by their row count: on this CPU,
    without the padding the two differ by ~1e-5.)"""
    import starflow.sampling.batch as batch_module
    from starflow.distributed import DistInfo
    from starflow.sampling.pipeline import Pipeline

    rows, kept = [], {}
    decode = Pipeline.__call__

    def spy(self, prompts, *args, **kwargs):
        rows.append(len(prompts))
        return decode(self, prompts, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "__call__", spy)
    out = tmp_path / "set"
    assert main(["generate-set", "--caption", "a handwritten digit 8", "--num_samples", "9", "--out", str(out),
                 "--sample_batch_size", "8", "--device", "cpu"]) == 0
    assert rows == [8, 8] and len(list(out.glob("*.png"))) == 9  # the last batch: sample 8 and 7 repeats

    pipe = Pipeline.from_pretrained(DEMO_DIR)
    captions = [f"a handwritten digit {d % 10}" for d in range(9)]
    settings = pipe.default_settings(batch_size=8)  # jacobi_block_size auto: token by token here
    monkeypatch.setattr(batch_module, "save_sample", lambda sample, stem, *a: kept.setdefault(stem.name, []).append(
        sample.clone()))
    for indices in (range(9), range(1, 9)):  # sample 8: alone in the last batch, then in a batch of 8
        batch_module.write_samples(pipe, captions, settings, tmp_path, seed=0, batch_size=8,
                                   dist=DistInfo(0, 1, 0, torch.device("cpu")), indices=list(indices),
                                   full_batches=True)
    alone, inside = kept["00008_a_handwritten_digit_8"]
    assert torch.equal(alone, inside)


def test_a_sharded_dry_run_counts_each_process_its_shard_of_the_weights(tmp_path: Path, monkeypatch, capsys) -> None:
    """``sample --fsdp 1 --dry_run`` of the 3B layout under torchrun (``WORLD_SIZE`` 2): each process holds half the
    flow's weights (as ``starflow validate --gpus 2`` counts them), and the plan says the flow is sharded; with
    ``--fsdp 0`` each holds them whole."""
    import re

    weights = tmp_path / "starflow_3B_t2i_256x256.pth"  # a dry run reads no weights
    weights.touch()
    config = Path(__file__).resolve().parents[1] / "configs" / "starflow_3B_t2i_256x256.yaml"
    monkeypatch.setenv("WORLD_SIZE", "2")
    gib = {}
    for fsdp in ("1", "0"):
        assert main(["sample", "--checkpoint_path", str(weights), "--model_config_path", str(config), "--caption", "a fox",
                     "--num_samples", "2", "--fsdp", fsdp, "--dry_run"]) == 0
        out = capsys.readouterr().out
        gib[fsdp] = float(re.search(r"weights ([0-9.]+) GiB", out).group(1))
        assert ("the flow sharded over 2 processes" in out) == (fsdp == "1")
    assert gib["0"] > 10 and gib["1"] == pytest.approx(gib["0"] / 2, abs=2e-3)
