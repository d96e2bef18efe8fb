"""Webdataset shards: packing, the resumable sharded stream, and latent caches."""
from __future__ import annotations

import itertools
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from starflow.adapters import build_text_encoder, build_tiny_sd_vae
from starflow.config import load_config
from starflow.data import (
    ImageFolder,
    PositionTracker,
    ShardStream,
    aspect_to_size,
    cache_latents,
    check_cache_settings,
    continue_positions,
    load_uncond,
    pack_folder,
    write_digits,
)
from starflow.data.video import VideoFolder, write_video
from starflow.prompts import EXTEND_PREFIX, apply_prompt_template
from starflow.train.trainer import data_fingerprint

REPO = Path(__file__).resolve().parents[1]

N = 40  # samples in the small folders


@pytest.fixture(scope="module")
def all_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image folder of all real training digits (written once)."""
    root = tmp_path_factory.mktemp("digits")
    write_digits(root)
    return root / "train"


def _digits_folder(src: Path, root: Path, n: int = N, unique: bool = False) -> Path:
    """The first ``n`` digits of ``src`` copied to ``root``; ``unique``: captions ``sample i``."""
    root.mkdir(parents=True)
    records = [json.loads(line) for line in (src / "metadata.jsonl").read_text().splitlines()[:n]]
    for i, record in enumerate(records):
        shutil.copy(src / record["file_name"], root / record["file_name"])
        if unique:
            record["text"] = f"sample {i}"
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def _aspect_folder(root: Path, n: int = N) -> Path:
    """Random greyscale images, alternately 8x8 (bucket 1:1) and 16x9 (w x h, bucket 16:9), captions ``sample i``."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    lines = []
    for i in range(n):
        w, h = (8, 8) if i % 2 else (16, 9)
        Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"sample {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _batches(stream: ShardStream, count: int, workers: int) -> list[dict]:
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == count:
            return out


def _as_set(pixels: torch.Tensor, texts: list[str]) -> list[tuple[str, bytes]]:
    return sorted((t, p.numpy().tobytes()) for p, t in zip(pixels, texts))


def test_pack_round_trips_image_folder(all_digits: Path, tmp_path: Path, capsys) -> None:
    from starflow.cli import main

    src = _digits_folder(all_digits, tmp_path / "src")
    assert main(["pack", str(src), str(tmp_path / "shards"), "--shard_size", "16"]) == 0
    assert "packed 40 images into 3 shards" in capsys.readouterr().out
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert index["kind"] == "image" and index["total"] == N and index["skipped"] == []
    assert [s["samples"] for s in index["shards"]] == [16, 16, 8]
    batch = next(iter(ShardStream(tmp_path / "shards", N, img_size=8, channels=1)))
    folder = ImageFolder(src, 8, channels=1)
    # what a resume compares (starflow.train.trainer.data_fingerprint): both name their N samples, and repacking
    # into other shards is another listing
    stream_print = data_fingerprint(ShardStream(tmp_path / "shards", N, img_size=8, channels=1))
    assert stream_print["samples"] == data_fingerprint(folder)["samples"] == N
    assert main(["pack", str(src), str(tmp_path / "shards10"), "--shard_size", "10"]) == 0
    repacked = data_fingerprint(ShardStream(tmp_path / "shards10", N, img_size=8, channels=1))
    assert repacked["samples"] == N and repacked["sha"] != stream_print["sha"]
    expected = [folder[i] for i in range(len(folder))]
    assert batch["pixels"].shape == (N, 1, 8, 8) and batch["pixels"].dtype == torch.float32
    assert _as_set(batch["pixels"], batch["text"]) == _as_set(torch.stack([s["pixels"] for s in expected]),
                                                            [s["text"] for s in expected])
    assert batch["aspect_ratio"] == ["1:1"] * N and tuple(batch["position"]) == (0, 0, 0)
    assert main(["pack", str(src), str(tmp_path / "shards")]) == 2  # shards exist: refused
    assert "--overwrite" in capsys.readouterr().err


def test_an_output_is_replaced_only_by_a_complete_one_and_never_the_source(all_digits: Path, tmp_path: Path,
                                                                         tiny_config) -> None:
    """--overwrite keeps the old shards when the new run fails; OUT = SRC is refused before anything is touched."""
    from starflow.adapters import build_latent_adapter, build_text_encoder
    from starflow.config import load_config
    from starflow.data.latent_cache import cache_latents

    src, out = _digits_folder(all_digits, tmp_path / "src", n=10), tmp_path / "shards"
    pack_folder(src, out, shard_size=4)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / ".staging-killed").mkdir()  # what a run killed mid-write leaves: the next run removes it
    (out / ".staging-killed" / "shard-000000.tar").write_bytes(b"half a shard")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metadata.jsonl").write_text(json.dumps({"file_name": "gone.png", "text": "x"}) + "\n")
    with pytest.raises(ValueError, match=f"no usable sample to write to {out}"):
        pack_folder(empty, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no staging folder left, the stale one gone
    with pytest.raises(ValueError, match="is the source folder"):
        pack_folder(src, src / ".", overwrite=True)
    cfg = load_config(dict(tiny_config))
    with pytest.raises(ValueError, match="is the source folder"):
        cache_latents(out, out, cfg, build_latent_adapter(None, channels=1), build_text_encoder(cfg), overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not (src / "index.json").exists()


def test_a_set_killed_while_it_replaced_the_old_one_is_incomplete_and_replaced_by_the_rerun(
        all_digits: Path, tmp_path: Path, monkeypatch) -> None:
    src, out = _digits_folder(all_digits, tmp_path / "src", n=10), tmp_path / "shards"
    pack_folder(src, out, shard_size=4)  # 3 shards
    moves = []
    real_replace = Path.replace

    def killed_on_the_third(self, target):
        moves.append(self.name)
        if len(moves) == 3:
            raise KeyboardInterrupt  # as a kill in the middle of moving the new set in
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", killed_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        pack_folder(src, out, shard_size=2, overwrite=True)  # 5 shards
    monkeypatch.setattr(Path, "replace", real_replace)
    assert not (out / "index.json").exists()  # incomplete: no reader takes it
    with pytest.warns(UserWarning, match=r"incomplete set \(a run killed while it replaced the set\)"):
        index = pack_folder(src, out, shard_size=2)  # no --overwrite needed to replace leftovers
    assert index["total"] == 10 and sorted(p.name for p in out.iterdir()) == [
        ".lock", "index.json", *(f"shard-{i:06d}.tar" for i in range(5))]  # (.lock: one writer at a time)
    made_elsewhere = tmp_path / "hand_made"  # webdataset shards of another tool: no index, and not ours to replace
    made_elsewhere.mkdir()
    (made_elsewhere / "shard-000000.tar").write_bytes(b"a user's shard")
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        pack_folder(src, made_elsewhere)
    assert [p.name for p in made_elsewhere.iterdir()] == ["shard-000000.tar"]


@pytest.mark.parametrize("damage, message", [(lambda text: text[:50], "is not valid JSON"),
                                             (lambda text: '{"kind": "image"}', "lacks the kind")])
def test_a_damaged_index_is_named_with_the_fix(all_digits: Path, tmp_path: Path, damage, message) -> None:
    from starflow.data.shards import read_index

    out = tmp_path / "shards"
    pack_folder(_digits_folder(all_digits, tmp_path / "src", n=4), out)
    assert read_index(out)[1]["total"] == 4
    (out / "index.json").write_text(damage((out / "index.json").read_text()))
    with pytest.raises(ValueError, match=f"index.json {message}.*make the folder again with `starflow pack`"):
        read_index(out)


@pytest.mark.parametrize("name", ["pipe:touch {marker}; cat shard-000000.tar", "../elsewhere.tar", "/abs/shard.tar",
                                  "shard-000000.tar.gz"])
def test_an_index_naming_a_shard_outside_its_folder_is_refused(all_digits: Path, tmp_path: Path, monkeypatch,
                                                               name: str) -> None:
    """A shard name is a .tar file under the folder: webdataset runs a "pipe:..." URL as a shell command (a shard
    folder downloaded and trained on with --data . ran it), and "../x.tar" would read any tar on the machine."""
    from starflow.data.shards import read_index
    from starflow.data.stream import ShardStream

    out = tmp_path / "shards"
    pack_folder(_digits_folder(all_digits, tmp_path / "src", n=4), out)
    index = json.loads((out / "index.json").read_text())
    marker = tmp_path / "ran"
    index["shards"][0]["name"] = name.format(marker=marker)
    (out / "index.json").write_text(json.dumps(index))
    monkeypatch.chdir(out)
    with pytest.raises(ValueError, match=r"index.json names the shard .*, which is not a .tar file in its folder"):
        read_index(".")
    with pytest.raises(ValueError, match="which is not a .tar file in its folder"):
        ShardStream(".", 4, img_size=8, channels=1)
    assert not marker.exists()


def test_pack_skips_corrupt_and_missing_files(all_digits: Path, tmp_path: Path) -> None:
    src = _digits_folder(all_digits, tmp_path / "src", n=10)
    (src / "bad.png").write_bytes(b"not a png at all")
    good = (src / json.loads((src / "metadata.jsonl").read_text().splitlines()[0])["file_name"]).read_bytes()
    (src / "truncated.png").write_bytes(good[: len(good) // 2])
    Image.fromarray(np.full((8, 8), 3.0, np.float32), mode="F").save(src / "float.tif")  # training would refuse it
    with (src / "metadata.jsonl").open("a") as f:
        for name in ("bad.png", "gone.png", "truncated.png", "float.tif"):
            f.write(json.dumps({"file_name": name, "text": "broken"}) + "\n")
    index = pack_folder(src, tmp_path / "shards", shard_size=4)
    assert index["total"] == 10
    assert sorted(s["file_name"] for s in index["skipped"]) == ["bad.png", "float.tif", "gone.png", "truncated.png"]
    assert {s["file_name"]: s["reason"] for s in index["skipped"]}["gone.png"] == "missing"
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        pack_folder(tmp_path / "nothing", tmp_path / "out")


def test_corrupt_sample_inside_a_shard_is_skipped(all_digits: Path, tmp_path: Path, caplog) -> None:
    import webdataset

    src = _digits_folder(all_digits, tmp_path / "src", n=7, unique=True)
    pack_folder(src, tmp_path / "shards")
    shard = tmp_path / "shards" / "shard-000000.tar"
    samples = list(webdataset.tarfile_samples([{"url": str(shard)}]))
    samples[2]["png"] = b"garbage"
    with webdataset.TarWriter(str(shard)) as writer:
        for s in samples:
            writer.write({k: v for k, v in s.items() if k != "__url__"})
    with caplog.at_level(logging.WARNING, logger="starflow.data.shards"):
        batch = next(iter(ShardStream(tmp_path / "shards", 6, img_size=8, channels=1, shuffle_buffer=0)))
    assert sorted(batch["text"]) == [f"sample {i}" for i in (0, 1, 3, 4, 5, 6)]
    assert "000000002" in caplog.text


@pytest.mark.parametrize("shard_size", [5, 20], ids=["split-by-shard", "split-by-sample"])
def test_epoch_covers_every_sample_once_over_ranks_and_workers(all_digits: Path, tmp_path: Path,
                                                              shard_size: int) -> None:
    pack_folder(_digits_folder(all_digits, tmp_path / "src", unique=True), tmp_path / "shards", shard_size=shard_size)
    seen, epochs = [], set()
    for rank in (0, 1):
        stream = ShardStream(tmp_path / "shards", 2, img_size=8, channels=1, seed=3, rank=rank, world_size=2,
                             shuffle_buffer=4)
        for batch in _batches(stream, 12, workers=2):  # 5 batches per worker and epoch, then epoch 1
            epochs.add(batch["position"].epoch)
            if batch["position"].epoch == 0:
                seen += batch["text"]
    assert epochs == {0, 1}
    assert sorted(seen) == sorted(f"sample {i}" for i in range(N))


def test_fewer_shards_than_slots_split_the_epoch_evenly(all_digits: Path, tmp_path: Path, monkeypatch) -> None:
    """2 shards of 10 over 3 ranks: each rank gets 6 or 7 samples of the epoch (a batch of 6 for every rank),
    opens only the shards its run touches, and the epoch holds every sample once."""
    from starflow.data import stream as stream_module

    pack_folder(_digits_folder(all_digits, tmp_path / "src", n=20, unique=True), tmp_path / "shards", shard_size=10)
    opened: list[list[str]] = []
    read = stream_module.read_shards
    monkeypatch.setattr(stream_module, "read_shards", lambda paths: opened.append(list(paths)) or read(paths))
    seen, shares = [], []
    for rank in range(3):
        stream = ShardStream(tmp_path / "shards", 1, img_size=8, channels=1, seed=3, rank=rank, world_size=3,
                             shuffle_buffer=0)
        epoch0 = [t for batch in itertools.islice(stream, 8) if batch["position"].epoch == 0 for t in batch["text"]]
        seen += epoch0
        shares.append(len(epoch0))
        first = ShardStream(tmp_path / "shards", 6, img_size=8, channels=1, seed=3, rank=rank, world_size=3)
        assert next(iter(first))["position"].epoch == 0  # a batch of 6 in the first epoch, on every rank
    assert sorted(shares) == [6, 7, 7] and sorted(seen) == sorted(f"sample {i}" for i in range(20))
    assert all(len(paths) == 1 for paths in opened)  # one shard at a time, only those of the run


def test_a_truncated_shard_shared_by_slots_is_named(all_digits: Path, tmp_path: Path, caplog) -> None:
    """One shard of 20 over 4 ranks, cut to 60% of its bytes: the rank whose run lies in the lost tail gets no
    samples; the warning names the shard and the rank's error says to repack it."""
    pack_folder(_digits_folder(all_digits, tmp_path / "src", n=20, unique=True), tmp_path / "shards", shard_size=20)
    shard = tmp_path / "shards" / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[: int(0.6 * shard.stat().st_size)])
    with caplog.at_level(logging.WARNING, logger="starflow.data.stream"), \
            pytest.raises(ValueError, match="or repack a damaged shard"):
        next(iter(ShardStream(tmp_path / "shards", 1, img_size=8, channels=1, rank=3, world_size=4)))
    assert "shard-000000.tar holds fewer samples than the 20 index.json lists" in caplog.text


def test_a_folder_without_samples_is_refused(tmp_path: Path) -> None:
    (tmp_path / "index.json").write_text(json.dumps({"kind": "image", "shards": [{"name": "a.tar", "samples": 0}]}))
    with pytest.raises(ValueError, match="index.json lists no samples"):
        ShardStream(tmp_path, 2, img_size=8, channels=1)


def test_a_short_last_shard_dealt_alone_to_a_slot_moves_it_to_the_next_epoch(all_digits: Path, tmp_path: Path) -> None:
    """Shards of 4, 4, 4, 4, 1 samples over 5 ranks, batches of 2: in each epoch one rank gets the 1-sample shard
    and forms no batch; it goes on to its next epoch instead of failing mid-run. A slot that can never fill a
    batch is still an error, after EMPTY_EPOCHS epochs in a row."""
    from starflow.data.stream import EMPTY_EPOCHS

    pack_folder(_digits_folder(all_digits, tmp_path / "src", n=17, unique=True), tmp_path / "shards", shard_size=4)
    for rank in range(5):
        stream = ShardStream(tmp_path / "shards", 2, img_size=8, channels=1, seed=3, rank=rank, world_size=5)
        batches = _batches(stream, 12, workers=0)
        assert len(batches) == 12 and all(len(b["text"]) == 2 for b in batches)
    with pytest.raises(ValueError, match=f"formed no batch of 5 in {EMPTY_EPOCHS} epochs in a row"):
        _batches(ShardStream(tmp_path / "shards", 5, img_size=8, channels=1, seed=3, rank=0, world_size=5), 1, 0)


def test_shuffle_buffer_holds_at_most_its_bytes() -> None:
    """Raw samples of 10 to 400 bytes through a 1,000-byte buffer: every one comes out once, the buffer never
    holds more than its bytes when it asks for the next sample, and under the bound the order is that of the
    count-only shuffle."""
    import random

    from starflow.data.stream import _shuffled

    sizes = random.Random(0).choices([10, 50, 400], k=300)
    held, peak = [0], [0]

    def samples():
        for i, n in enumerate(sizes):
            peak[0] = max(peak[0], held[0])
            held[0] += n
            yield {"__key__": str(i), "png": bytes(n)}

    out = []
    for sample in _shuffled(samples(), 100, random.Random(1), max_bytes=1000):
        held[0] -= len(sample["png"])
        out.append(int(sample["__key__"]))
    assert sorted(out) == list(range(300)) and out != sorted(out)
    assert 600 < peak[0] <= 1000

    def count_only(items, size, rng):  # the shuffle without a byte bound
        buf = []
        for item in items:
            if len(buf) < size:
                buf.append(item)
                continue
            j = rng.randrange(size)
            yield buf[j]
            buf[j] = item
        rng.shuffle(buf)
        yield from buf

    under = [s["__key__"] for s in _shuffled(samples(), 100, random.Random(1), max_bytes=1 << 30)]
    assert under == [s["__key__"] for s in count_only(samples(), 100, random.Random(1))]


def test_resume_continues_the_uninterrupted_stream(tmp_path: Path) -> None:
    pack_folder(_aspect_folder(tmp_path / "images"), tmp_path / "shards", shard_size=7)
    settings = dict(img_size=8, channels=1, multiple=2, mix_aspect=True, seed=1, shuffle_buffer=8)
    full = _batches(ShardStream(tmp_path / "shards", 3, **settings), 16, workers=2)
    assert {b["position"].epoch for b in full} == {0, 1}
    for b in full:  # one bucket per batch, at that bucket's size
        (bucket,) = set(b["aspect_ratio"])
        assert b["pixels"].shape[-2:] == aspect_to_size(bucket, 8, 2)
    assert {b["aspect_ratio"][0] for b in full} == {"1:1", "16:9"}

    tracker = PositionTracker(num_workers=2)
    for b in _batches(ShardStream(tmp_path / "shards", 3, **settings), 7, workers=2):
        tracker.update(b["position"])
    state = json.loads(json.dumps(tracker.state_dict()))  # as stored in a checkpoint
    resumed = ShardStream(tmp_path / "shards", 3, **settings)
    resumed.set_position(**state)
    rest = _batches(resumed, 9, workers=2)
    for a, b in zip(full[7:], rest, strict=True):
        assert a["position"] == b["position"] and a["text"] == b["text"]
        assert torch.equal(a["pixels"], b["pixels"])


def test_continue_positions_counts_the_samples_consumed() -> None:
    """Another layout continues at the fraction of epochs the old slots consumed, its share of the rest skipped."""
    def saved(*slots: tuple[int, int], workers: int = 2, micro: int = 2) -> dict:
        return {"stream": {"positions": {str(w): list(p) for w, p in enumerate(slots)}, "next_worker": 0},
                "num_workers": workers, "micro_batch": micro}

    # 2 ranks x 2 workers of 40 samples: 10 per slot and epoch; each slot 3 batches of 2 in: 24 of 40 consumed
    four_slots = [saved((0, 3), (0, 3)), saved((0, 3), (0, 3))]
    assert continue_positions(four_slots, num_samples=40, world_size=1, num_workers=0, batch_size=4) == \
        {"positions": {"0": [0, 6]}, "next_worker": 0}  # 0.6 epochs: 6 of 10 batches of 4
    # across an epoch boundary: 2 x (10 + 2) + 2 x 10 = 44 samples, 1.1 epochs; the 4 new slots skip 1 batch each
    boundary = [saved((1, 1), (0, 5)), saved((1, 1), (0, 5))]
    assert continue_positions(boundary, num_samples=40, world_size=2, num_workers=2, batch_size=1) == \
        {"positions": {"0": [1, 1], "1": [1, 1]}, "next_worker": 0}
    # a worker that never handed out a batch has no entry: it is at (0, 0)
    assert continue_positions([saved((0, 4), workers=2)], num_samples=16, world_size=1, num_workers=1,
                              batch_size=2) == {"positions": {"0": [0, 4]}, "next_worker": 0}
    with pytest.raises(ValueError, match="at least one rank"):
        continue_positions([], num_samples=40, world_size=1, num_workers=1, batch_size=1)


def test_resume_skips_without_decoding(tmp_path: Path, monkeypatch) -> None:
    from starflow.data.shards import SampleDecoder

    pack_folder(_aspect_folder(tmp_path / "images"), tmp_path / "shards", shard_size=7)
    settings = dict(img_size=8, channels=1, multiple=2, mix_aspect=True, seed=1, shuffle_buffer=8)
    full = list(itertools.islice(ShardStream(tmp_path / "shards", 3, **settings), 8))  # no workers: worker 0
    calls = []
    decode = SampleDecoder.decode
    monkeypatch.setattr(SampleDecoder, "decode", lambda self, *a: calls.append(1) or decode(self, *a))
    stream = ShardStream(tmp_path / "shards", 3, **settings)
    stream.set_position({0: tuple(full[6]["position"][1:])})
    batch = next(iter(stream))
    assert batch["position"] == full[6]["position"] and batch["text"] == full[6]["text"]
    assert len(calls) == 3  # only the batch returned was decoded


def test_video_folder_packs_and_streams_clips(tmp_path: Path, monkeypatch) -> None:
    """pack checks that every frame of a video decodes without keeping the frames (a minute of 1080p is ~11 GB as
    RGB); the packed clips stream as the folder reads them."""
    import starflow.data.video as video

    converted = []
    upright_rgb = video._upright_rgb
    monkeypatch.setattr(video, "_upright_rgb", lambda frame: converted.append(1) or upright_rgb(frame))
    rng = np.random.default_rng(0)
    src = tmp_path / "videos"
    lines = []
    for i in range(4):
        write_video(src / f"{i}.mp4", rng.integers(0, 256, (5, 8, 8), dtype=np.uint8), 8, lossless=True)
        lines.append(json.dumps({"file_name": f"{i}.mp4", "text": f"clip {i}", "fps": "8" if i % 2 else 8}))
    (src / "broken.mp4").write_bytes(b"\x00" * 64)
    lines.append(json.dumps({"file_name": "broken.mp4", "text": "broken"}))
    (src / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    index = pack_folder(src, tmp_path / "shards")
    assert index["kind"] == "video" and index["total"] == 4 and index["skipped"][0]["file_name"] == "broken.mp4"
    assert converted == []  # (no frame was kept as RGB)
    batch = next(iter(ShardStream(tmp_path / "shards", 4, frames=5, fps=8, size=(8, 8), channels=1)))
    assert batch["pixels"].shape == (4, 5, 1, 8, 8)
    folder = VideoFolder(src, frames=5, fps=8, size=(8, 8), channels=1, random_start=False)
    expected = [folder[i] for i in range(4)]
    assert _as_set(batch["pixels"], batch["text"]) == _as_set(torch.stack([s["pixels"] for s in expected]),
                                                            [s["text"] for s in expected])


def test_gifs_pack_as_clips_when_animated_and_shards_of_the_other_kind_are_refused(tmp_path: Path) -> None:
    from starflow.data.build import build_dataset

    rng = np.random.default_rng(0)
    for name, frames in (("animated", 5), ("still", 1)):
        src = tmp_path / name
        src.mkdir()
        lines = []
        for i in range(3):
            images = [Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)) for _ in range(frames)]
            images[0].save(src / f"{i}.gif", save_all=frames > 1, append_images=images[1:], duration=125, loop=0)
            lines.append(json.dumps({"file_name": f"{i}.gif", "text": f"a handwritten digit {i}"}))
        (src / "metadata.jsonl").write_text("\n".join(lines) + "\n")
        assert pack_folder(src, tmp_path / f"{name}_shards")["kind"] == ("video" if frames > 1 else "image")
    video_cfg = load_config(str(REPO / "configs" / "demo_moving_digits.yaml"), {"data": str(tmp_path / "still_shards")})
    with pytest.raises(ValueError, match="shards of images .* but this is a video config"):
        build_dataset(video_cfg, downsample=1)
    image_cfg = load_config(str(REPO / "configs" / "demo_digits.yaml"), {"data": str(tmp_path / "animated_shards")})
    with pytest.raises(ValueError, match="shards of videos .* but this is an image config"):
        build_dataset(image_cfg, downsample=1)


def test_cache_latents_stores_vae_and_text_outputs(all_digits: Path, tmp_path: Path, tiny_config) -> None:
    src = _digits_folder(all_digits, tmp_path / "src", n=10, unique=True)
    keys = dict(channel_size=4, txt_size=48, drop_image=0.5, fps_cond=1, cond_noise_level=1)
    cfg = load_config(dict(tiny_config, **keys))
    vae, text_encoder = build_tiny_sd_vae(), build_text_encoder(cfg, device="cpu")
    index = cache_latents(src, tmp_path / "cache", cfg, vae, text_encoder, batch_size=4)
    assert index["kind"] == "latent" and index["total"] == 10
    check_cache_settings(index, cfg)
    batch = next(iter(ShardStream(tmp_path / "cache", 10, shuffle_buffer=0)))
    folder = {s["text"]: s["pixels"] for s in (ImageFolder(src, 8, channels=3)[i] for i in range(10))}
    pixels = torch.stack([folder[t] for t in batch["text"]])
    torch.testing.assert_close(batch["latents"], vae.encode(pixels, sample=False), rtol=0, atol=1e-6)
    assert batch["latents"].shape == (10, 4, 4, 4)
    template = dict(fps=0, fps_cond=True, cond_noise_level=True, noise_std=cfg.noise_std, mix_aspect=False)
    prompts = [apply_prompt_template(t, **template) for t in batch["text"]]
    torch.testing.assert_close(batch["text_emb"], text_encoder(prompts), rtol=0, atol=1e-6)
    extend = [apply_prompt_template(EXTEND_PREFIX + t, **template) for t in batch["text"]]
    torch.testing.assert_close(batch["text_emb_extend"], text_encoder(extend), rtol=0, atol=1e-6)
    uncond = text_encoder([apply_prompt_template("", **template)])[0]
    torch.testing.assert_close(load_uncond(tmp_path / "cache"), uncond, rtol=0, atol=1e-6)
    assert not torch.equal(batch["text_emb"][0], batch["text_emb"][1])  # captions differ within txt_size
    assert not torch.equal(batch["text_emb"], batch["text_emb_extend"])
    with pytest.raises(ValueError, match="img_size.*cache-latents"):
        check_cache_settings(tmp_path / "cache", load_config(dict(tiny_config, **keys, img_size=16)))
    # the tiny text encoder is drawn from the seed: another seed embeds the captions with another encoder
    with pytest.raises(ValueError, match="seed: cache 0, config 5.*resumes with --seed 0"):
        check_cache_settings(tmp_path / "cache", load_config(dict(tiny_config, **keys, seed=5)))


def test_cache_latents_command_on_shards(all_digits: Path, tmp_path: Path, config_file, tiny_config, capsys) -> None:
    from starflow.cli import main

    pack_folder(_digits_folder(all_digits, tmp_path / "src", n=6), tmp_path / "shards")
    config = config_file(dict(tiny_config))
    assert main(["cache-latents", "--config", str(config), "--data", str(tmp_path / "shards"),
                 "--out", str(tmp_path / "cache"), "--batch", "4"]) == 0
    assert "cached 6 latents" in capsys.readouterr().out
    batch = next(iter(ShardStream(tmp_path / "cache", 6)))
    assert batch["latents"].shape == (6, 1, 8, 8) and batch["text_emb"].shape == (6, 24, 32)
    assert "text_emb_extend" not in batch
    check_cache_settings(tmp_path / "cache", load_config(config))


@pytest.mark.parametrize("flags, message", [
    (["--cfg", "5"], "--cfg 5: `starflow cache-latents` does not use this key"),
    (["--lr", "1e-3"], "--lr 1e-3: a training key, which `starflow cache-latents` does not use"),
    (["--batch", "0"], "argument --batch: must be >= 1, got 0"),
    (["--shard_size", "-1"], "argument --shard_size: must be >= 1, got -1"),
    (["--vid_size", "4:8"], "holds images, and the config is for videos (vid_size)"),
])
def test_cache_latents_refuses_flags_it_would_ignore_and_data_of_another_kind(
        all_digits: Path, tmp_path: Path, config_file, tiny_config, capsys, flags, message) -> None:
    from starflow.cli import main

    src = _digits_folder(all_digits, tmp_path / "src", n=2)
    args = ["cache-latents", "--config", str(config_file(dict(tiny_config))), "--data", str(src),
            "--out", str(tmp_path / "cache"), *flags]
    try:
        code = main(args)
    except SystemExit as e:  # a usage error
        code = e.code
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


def test_cache_latents_refuses_before_the_models_load(all_digits: Path, tmp_path: Path, config_file, tiny_config,
                                                      monkeypatch, capsys) -> None:
    """An output folder that already holds a cache, or data of the other kind, is named before the VAE and the text
    encoder load (minutes for the released ones)."""
    import starflow.adapters
    from starflow.cli import main

    src = _digits_folder(all_digits, tmp_path / "src", n=2)
    config = str(config_file(dict(tiny_config)))
    assert main(["cache-latents", "--config", config, "--data", str(src), "--out", str(tmp_path / "cache")]) == 0
    before = sorted(p.name for p in (tmp_path / "cache").iterdir())

    def no_model(*args, **kwargs):
        raise AssertionError("a model loaded before the inputs were checked")

    monkeypatch.setattr(starflow.adapters, "build_vae", no_model)
    monkeypatch.setattr(starflow.adapters, "build_text_encoder", no_model)
    capsys.readouterr()
    for args, message in ((["--out", str(tmp_path / "cache")], "already holds shards (shard-000000.tar, ...); pass "
                                                               "--overwrite to replace them"),
                          (["--out", str(tmp_path / "other"), "--vid_size", "4:8"],
                           "holds images, and the config is for videos (vid_size)"),
                          (["--out", str(src)], "is the source folder")):
        assert main(["cache-latents", "--config", config, "--data", str(src), *args]) == 2
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == before
    assert not (tmp_path / "other").exists()


def test_cache_latents_counts_the_samples_of_a_missing_shard(all_digits: Path, tmp_path: Path, tiny_config,
                                                            caplog) -> None:
    from starflow.adapters import build_latent_adapter, build_text_encoder
    from starflow.data.latent_cache import cache_latents

    shards = tmp_path / "shards"
    pack_folder(_digits_folder(all_digits, tmp_path / "src", n=10), shards, shard_size=4)
    (shards / "shard-000001.tar").unlink()
    cfg = load_config(dict(tiny_config))
    index = cache_latents(shards, tmp_path / "cache", cfg, build_latent_adapter(None, channels=1),
                          build_text_encoder(cfg))
    assert index["total"] == 6
    assert index["skipped"] == [{"file_name": "4 of the 10 samples listed in the shard index",
                                 "reason": "missing or damaged shard", "count": 4}]


def test_cache_latents_resumes_an_interrupted_run(all_digits: Path, tmp_path: Path, tiny_config, monkeypatch,
                                                 caplog) -> None:
    """A run stopped mid-way (Ctrl-C) keeps its full shards; the rerun encodes only the other samples and makes the
    cache an uninterrupted run makes, sample for sample. A rerun of other inputs (another shard_size) starts afresh; a
    damaged kept shard is written again; a file removed after its sample was cached leaves the other keys as they
    were."""
    from starflow.adapters import build_latent_adapter
    from starflow.data.latent_cache import _Encoder, cache_latents
    from starflow.data.shards import RESUME_FOLDER, read_shards

    src = _digits_folder(all_digits, tmp_path / "src", n=10, unique=True)
    cfg = load_config(dict(tiny_config))
    vae, text_encoder = build_latent_adapter(None, channels=1), build_text_encoder(cfg)

    def cache(out: Path, shard_size: int = 3) -> dict:
        return cache_latents(src, out, cfg, vae, text_encoder, batch_size=2, shard_size=shard_size)

    def contents(out: Path) -> list[dict]:
        index = json.loads((out / "index.json").read_text())
        return [{k: v for k, v in sample.items() if k != "__url__"}
                for sample in read_shards([out / s["name"] for s in index["shards"]])]

    whole = cache(tmp_path / "whole")
    encoded: list[str] = []
    batch = _Encoder.batch

    def counted(self, items):
        if len(encoded) == 6 and stop:
            raise KeyboardInterrupt
        encoded.extend(raw["__key__"] for raw, _ in items)
        yield from batch(self, items)

    monkeypatch.setattr(_Encoder, "batch", counted)
    out, stop = tmp_path / "cache", True
    with pytest.raises(KeyboardInterrupt):
        cache(out)
    progress = json.loads((out / RESUME_FOLDER / "progress.json").read_text())
    assert [(s["name"], s["samples"]) for s in progress["shards"]] == [("shard-000000.tar", 3)]  # shard 1: unclosed
    assert not (out / "index.json").exists()
    encoded.clear()
    stop = False
    with caplog.at_level(logging.WARNING, logger="starflow.data.shards"):
        index = cache(out)
    assert "resuming: 3 sample(s) in 1 shard(s) already written by an interrupted run" in caplog.text
    assert sorted(encoded) == [f"{i:09d}" for i in range(3, 10)]  # the first shard's samples are not encoded again
    assert index == dict(whole, source=index["source"]) and contents(out) == contents(tmp_path / "whole")
    assert not (out / RESUME_FOLDER).exists()

    def interrupted(out: Path) -> None:
        nonlocal stop
        encoded.clear()
        stop = True
        with pytest.raises(KeyboardInterrupt):
            cache(out)
        encoded.clear()
        stop = False
        caplog.clear()

    interrupted(tmp_path / "other")
    with caplog.at_level(logging.WARNING, logger="starflow.data.shards"):
        cache(tmp_path / "other", shard_size=4)
    assert "discarding the 1 shard(s) an interrupted run left in" in caplog.text and "(shard_size)" in caplog.text
    assert len(encoded) == 10

    interrupted(tmp_path / "damaged")  # a kept shard cut short is written again, and the ones after it
    kept = tmp_path / "damaged" / RESUME_FOLDER / "shard-000000.tar"
    kept.write_bytes(kept.read_bytes()[:-1024])
    with caplog.at_level(logging.WARNING, logger="starflow.data.shards"):
        cache(tmp_path / "damaged")
    assert "shard-000000.tar in" in caplog.text and "is missing or damaged" in caplog.text
    assert len(encoded) == 10 and contents(tmp_path / "damaged") == contents(tmp_path / "whole")

    interrupted(tmp_path / "moved")  # samples are named by their metadata line: a file gone since keeps the others'
    lines = (src / "metadata.jsonl").read_text().splitlines()
    (src / json.loads(lines[1])["file_name"]).unlink()  # (cached in the kept shard)
    cache(tmp_path / "moved")
    assert sorted(encoded) == [f"{i:09d}" for i in range(3, 10)]
    assert contents(tmp_path / "moved") == contents(tmp_path / "whole")


def test_single_process_commands_refuse_several_processes(all_digits: Path, tmp_path: Path, monkeypatch,
                                                          capsys) -> None:
    """Under torchrun every process would do the whole job and write the same files: the one-process commands refuse
    before any work, in one line (rank 0's), writing nothing."""
    from starflow.cli import main

    config = Path(__file__).resolve().parents[1] / "configs" / "demo_digits.yaml"
    commands = [["pack", str(all_digits), str(tmp_path / "shards")],
                ["cache-latents", "--config", str(config), "--data", str(all_digits), "--out", str(tmp_path / "cache")],
                ["export", str(tmp_path / "run"), str(tmp_path / "model")],
                ["convert", str(tmp_path / "w.pth"), str(tmp_path / "w.safetensors")],
                ["evaluate", "--samples", str(all_digits), "--reference", str(all_digits), "--features", "digits"],
                ["validate", str(config)],
                ["inpaint", "--input_image", str(tmp_path / "x.png"), "--mask_box", "0,0,4,4", "--caption", "x"]]
    monkeypatch.setenv("WORLD_SIZE", "2")
    record = tmp_path / "error.json"  # torchrun's error file of this rank
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(record))
    for rank, shown in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        for argv in commands:
            assert main(argv) == 2
            err = capsys.readouterr().err
            line = f"error: starflow {argv[0]} runs on one process, and 2 were started (torchrun): start it without " \
                   "torchrun"
            assert (line in err) == shown and (shown or not err), err
            assert json.loads(record.read_text())["message"]["message"] == line  # for torchrun's failure summary
    assert [p.name for p in tmp_path.iterdir()] == ["error.json"]


def test_listings_that_repeat_or_leave_out_files_are_named_and_odd_names_pack(all_digits: Path, tmp_path: Path,
                                                                              caplog) -> None:
    """metadata.jsonl decides what trains: a file listed twice is two samples (said), files it does not list are
    left out (said, with a metadata.jsonl of a subfolder, which is not read), and an image named like a caption or
    metadata file (.txt, .json) packs as an image, not overwritten by the caption."""
    src = _digits_folder(all_digits, tmp_path / "src", n=6)
    lines = (src / "metadata.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    shutil.copy(src / first["file_name"], src / "odd.txt")
    (src / "more").mkdir()
    shutil.copy(src / first["file_name"], src / "more" / "extra.png")
    (src / "more" / "metadata.jsonl").write_text(json.dumps({"file_name": "extra.png", "text": "x"}))
    (src / "kept").mkdir()  # listed through a symlink to its folder: listed
    shutil.copy(src / first["file_name"], src / "kept" / "linked.png")
    (src / "alias").symlink_to(src / "kept", target_is_directory=True)
    shutil.copy(src / first["file_name"], tmp_path / "beside.png")
    lines += [json.dumps(dict(first, file_name="./" + first["file_name"], text="another caption")),
              json.dumps({"file_name": "odd.txt", "text": "an image named .txt"}),
              json.dumps({"file_name": "alias/linked.png", "text": "listed by a symlinked folder"}),
              json.dumps({"file_name": "../beside.png", "text": "outside the folder"})]
    (src / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="starflow.data.images"):
        folder = ImageFolder(src, 8, channels=1)
    assert len(folder) == 10
    assert f"1 listed file(s) lie outside it (e.g. {tmp_path / 'beside.png'}): they are read as listed" in caplog.text
    assert f"1 file(s) listed more than once in metadata.jsonl (e.g. {src / first['file_name']}, 2 times)" in caplog.text
    assert (f"1 image file(s) under it not listed in its metadata.jsonl, so not trained on (e.g. "
            f"{src / 'more' / 'extra.png'}); {src / 'more' / 'metadata.jsonl'} is not read") in caplog.text
    index = pack_folder(src, tmp_path / "shards", shard_size=16)
    assert index["total"] == 10 and index["skipped"] == []
    batch = next(iter(ShardStream(tmp_path / "shards", 10, img_size=8, channels=1)))
    odd = batch["text"].index("an image named .txt")
    assert torch.equal(batch["pixels"][odd], folder[0]["pixels"])  # (odd.txt is a copy of the first image)


def test_shards_missing_from_the_folder_or_the_index_are_named(all_digits: Path, tmp_path: Path, caplog) -> None:
    src = _digits_folder(all_digits, tmp_path / "src", n=12)
    index = pack_folder(src, tmp_path / "shards", shard_size=4)
    names = [s["name"] for s in index["shards"]]
    (tmp_path / "shards" / names[1]).rename(tmp_path / "shards" / "copied-in.tar")
    with caplog.at_level(logging.WARNING, logger="starflow.data.stream"):
        ShardStream(tmp_path / "shards", 4, img_size=8, channels=1)
    assert f"1 shard(s) its index.json lists are missing (e.g. {names[1]}): their 4 samples are skipped" in caplog.text
    assert "1 .tar file(s) in it are not in its index.json, so not trained on (e.g. copied-in.tar)" in caplog.text


def test_a_compressed_shard_is_skipped_unread(all_digits: Path, tmp_path: Path, caplog) -> None:
    """A .tar that is gzip inside (tarfile's stream mode would unpack it, each member read whole: a 14 MB file can
    hold a 3 GiB member) is skipped with a warning; the plain shards are read."""
    import gzip

    from starflow.data.shards import read_shards

    src = _digits_folder(all_digits, tmp_path / "src", n=8)
    index = pack_folder(src, tmp_path / "shards", shard_size=4)
    first, second = (tmp_path / "shards" / s["name"] for s in index["shards"])
    first.write_bytes(gzip.compress(first.read_bytes()))
    with caplog.at_level(logging.WARNING, logger="starflow.data.shards"):
        samples = list(read_shards([first, second]))
    assert len(samples) == 4 and {s["__url__"] for s in samples} == {str(second)}
    assert f"skipping {first}: a compressed tar (shards are plain tar files)" in caplog.text


def test_an_undecodable_sample_is_named_by_its_key_and_shard(caplog) -> None:
    """A sample's image or video is a stream: messages name it by its key and shard, not by the stream's repr."""
    from starflow.data.shards import SampleDecoder

    sample = {"__key__": "k1", "__url__": "/data/shard-000003.tar", "png": b"not an image", "txt": b"a caption"}
    with caplog.at_level(logging.WARNING, logger="starflow.data.shards"):
        assert SampleDecoder("image", img_size=8, channels=1, mix_aspect=True).bucket(sample) is None
        video = {"__key__": "k2", "__url__": "/data/shard-000003.tar", "mp4": b"not a video", "txt": b"a caption"}
        assert SampleDecoder("video", frames=3, fps=8, size=(8, 8), channels=1).decode(video, "1:1") is None
    assert "cannot read image sample k1 of /data/shard-000003.tar: cannot identify image file)" in caplog.text
    assert "cannot decode video sample k2 of /data/shard-000003.tar: " in caplog.text
    assert "BytesIO" not in caplog.text


def test_cache_latents_stopped_by_sigterm_cleans_up_and_says_so(all_digits: Path, tmp_path: Path, config_file,
                                                               tiny_config) -> None:
    """SIGTERM stops ``cache-latents`` as Ctrl-C does (it used to kill it outright): the lock goes, the cache already in
    the output folder stays, the full shards written so far stay aside for a rerun, and the message says so."""
    import signal
    import subprocess
    import sys
    import time

    from helpers import run_env

    config = str(config_file(dict(tiny_config)))
    out = tmp_path / "cache"
    base = [sys.executable, "-m", "starflow.cli", "cache-latents", "--config", config, "--out", str(out)]
    small = _digits_folder(all_digits, tmp_path / "small", n=4)
    assert subprocess.run([*base, "--data", str(small)], env=run_env(tmp_path), capture_output=True,
                          timeout=300).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"}
    proc = subprocess.Popen([*base, "--data", str(all_digits), "--overwrite", "--batch", "1", "--shard_size", "8"],
                            env=run_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    progress = out / ".staging-resume" / "progress.json"
    while time.time() < deadline and proc.poll() is None and b'"name"' not in (progress.read_bytes()
                                                                               if progress.exists() else b""):
        time.sleep(0.05)  # (until a shard is full)
    assert proc.poll() is None, "the run ended before it was signalled"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert ("stopped by SIGTERM before it finished: rerun the same command to resume (from the shards it finished, "
            "kept in the output folder's .staging-resume; the cache already in the output folder, if any, is unchanged "
            "until the new one is complete)") in err
    assert "Traceback" not in err
    assert [p.name for p in out.glob(".staging-*")] == [".staging-resume"]  # (what a rerun goes on from)
    kept = json.loads(progress.read_text())["shards"]
    assert kept and all(s["samples"] == 8 and (progress.parent / s["name"]).is_file() for s in kept)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"} == before
