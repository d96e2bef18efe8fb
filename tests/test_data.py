"""Tests of starflow.data: aspect sizes, image folders, corrupt files, bucket batches, digits split."""

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from starflow.data import (
    ASPECT_RATIOS,
    AspectBucketBatchSampler,
    CorruptImageError,
    ImageFolder,
    aspect_to_size,
    collate,
    load_digit_split,
    load_image,
    nearest_aspect,
    split_indices,
    write_digits,
)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    counts = write_digits(out)
    return out, counts


def _write_folder(root, images: dict[str, Image.Image], texts: dict[str, str] | None = None):
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, img in images.items():
        img.save(root / name)
        lines.append(json.dumps({"file_name": name, "text": (texts or {}).get(name, f"caption {name}")}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------- aspect ratios (SPEC 13)


def test_aspect_to_size_by_hand():
    # S = 256, m = 8. 16:9: h = sqrt(65536 * 9/16) = 192 -> 24 * 8; w = sqrt(65536 * 16/9) = 341.33,
    # 341.33 / 8 = 42.67 -> 43 * 8 = 344.
    assert aspect_to_size("1:1", 256, 8) == (256, 256)
    assert aspect_to_size("16:9", 256, 8) == (192, 344)
    assert aspect_to_size("9:16", 256, 8) == (344, 192)
    # 2:3: h = sqrt(65536 * 1.5) = 313.5 -> 39.19 -> 312; w = sqrt(65536 / 1.5) = 209.0 -> 26.13 -> 208.
    assert aspect_to_size("2:3", 256, 8) == (312, 208)
    for ratio in ASPECT_RATIOS:
        h, w = aspect_to_size(ratio, 256, 16)
        assert h % 16 == 0 and w % 16 == 0 and abs(h * w / 256**2 - 1) < 0.1


@pytest.mark.parametrize("bad", ["16x9", "16:", ":9", "a:b", "0:1", "1:-2", "1:2:3", "", "inf:1"])
def test_malformed_aspect_raises(bad):
    with pytest.raises(ValueError, match="aspect ratio"):
        aspect_to_size(bad, 256, 8)


def test_nearest_aspect():
    assert nearest_aspect(1920, 1080) == "16:9"
    assert nearest_aspect(100, 100) == "1:1"
    assert nearest_aspect(1000, 1500) == "2:3"
    assert nearest_aspect(100, 1000) == "9:21"


# ---------------------------------------------------------------- images


def test_load_image_resizes_shorter_side_and_centre_crops(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)  # (H, W, C): white centre columns 10..29, black sides
    arr[:, 10:30] = 255
    Image.fromarray(arr).save(tmp_path / "wide.png")
    x = load_image(tmp_path / "wide.png", (10, 10), channels=3)  # 40x20 -> 20x10 -> centre 10x10
    assert x.shape == (3, 10, 10) and x.dtype == torch.float32
    assert x[:, :, 1:-1].min() > 0.9  # the crop keeps only the white centre
    assert load_image(tmp_path / "wide.png", (6, 8), channels=1).shape == (1, 6, 8)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(CorruptImageError):
        load_image(tmp_path / "junk.png", (8, 8), channels=1)


def test_load_image_reads_16_bit_float_and_transparent_images(tmp_path, caplog):
    """16-bit and float greyscale are scaled to 8 bits (not clipped), transparency is composited onto white (with a
    warning), and a float image outside [0, 1] is refused."""
    from starflow.data import images

    grey = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    want = load_image(tmp_path / "grey.png", (8, 8), channels=1)
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    Image.fromarray(grey.astype(np.float32) / 255).save(tmp_path / "grey.tiff")
    for name in ("grey16.png", "grey.tiff"):
        assert torch.equal(load_image(tmp_path / name, (8, 8), channels=1), want), name
    Image.fromarray(grey.astype(np.float32) * 2).save(tmp_path / "bright.tiff")
    with pytest.raises(CorruptImageError, match=r"float image with values in \[\d+, \d+\]: floats are read as 0..1"):
        load_image(tmp_path / "bright.tiff", (8, 8), channels=1)
    rgba = np.zeros((8, 8, 4), np.uint8)  # black ink whose alpha is the digit, fully transparent elsewhere
    rgba[..., 3] = grey
    Image.fromarray(rgba, "RGBA").save(tmp_path / "ink.png")
    images._warned_transparency = False
    with caplog.at_level(logging.WARNING, logger="starflow.data.images"):
        got = load_image(tmp_path / "ink.png", (8, 8), channels=1)
    torch.testing.assert_close(got, 1 - (want + 1), atol=1 / 127.5, rtol=0)  # 255 - alpha: dark ink on white
    assert "composited onto white" in caplog.text
    opaque = rgba.copy()
    opaque[..., :3], opaque[..., 3] = grey[..., None], 255
    Image.fromarray(opaque, "RGBA").save(tmp_path / "opaque.png")
    assert torch.equal(load_image(tmp_path / "opaque.png", (8, 8), channels=1), want)


def test_digits_folder_round_trip(digits_dir):
    out, counts = digits_dir
    assert counts == {"train": 1438, "test": 359}
    ds = ImageFolder(out / "test", img_size=8, channels=1)
    assert len(ds) == 359 and not ds.skipped
    images, labels = load_digit_split("test")
    meta = [json.loads(line) for line in (out / "test" / "metadata.jsonl").read_text().splitlines()]
    for i in (0, 1, 100, 358):
        sample = ds[i]
        assert sample["pixels"].shape == (1, 8, 8) and sample["aspect_ratio"] == "1:1"
        assert -1 <= sample["pixels"].min() and sample["pixels"].max() <= 1
        assert sample["text"] == f"a handwritten digit {labels[i]}" == meta[i]["text"]
        assert meta[i]["label"] == labels[i]
        expected = torch.from_numpy(images[i].astype(np.float32) / 127.5 - 1)
        torch.testing.assert_close(sample["pixels"][0], expected)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=16, collate_fn=collate)))
    assert batch["pixels"].shape == (16, 1, 8, 8) and len(batch["text"]) == 16


def test_digit_split_is_fixed_and_disjoint(digits_dir):
    out, _ = digits_dir
    a, b = split_indices(), split_indices()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not set(a["train"]) & set(a["test"]) and len(set(a["train"]) | set(a["test"])) == 1797
    names = {s: {p.name for p in (out / s).glob("*.png")} for s in ("train", "test")}
    assert not names["train"] & names["test"]
    assert not np.array_equal(split_indices(seed=1)["test"], a["test"])
    images, labels = load_digit_split("train")
    assert images.shape == (1438, 8, 8) and images.dtype == np.uint8 and set(labels.tolist()) == set(range(10))


def test_a_test_fraction_of_zero_writes_no_empty_test_folder(tmp_path):
    assert write_digits(tmp_path, test_fraction=0.0) == {"train": 1797}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"]


def test_corrupt_and_missing_files_are_skipped(tmp_path, digits_dir, caplog):
    out, _ = digits_dir
    root = tmp_path / "folder"
    root.mkdir()
    meta = (out / "test" / "metadata.jsonl").read_text().splitlines()[:10]
    for line in meta:
        shutil.copy(out / "test" / json.loads(line)["file_name"], root)
    names = [json.loads(line)["file_name"] for line in meta]
    (root / names[2]).write_bytes(b"\x00garbage bytes, not a png" * 4)
    data = (root / names[5]).read_bytes()
    (root / names[5]).write_bytes(data[: len(data) // 2])  # truncated
    meta.append(json.dumps({"file_name": "gone.png", "text": "missing"}))
    (root / "metadata.jsonl").write_text("\n".join(meta) + "\n")

    with caplog.at_level(logging.WARNING, logger="starflow.data.images"):
        ds = ImageFolder(root, img_size=8, channels=1)
        assert len(ds) == 10  # the missing file is dropped at construction
        assert ds[2]["text"] == json.loads(meta[3])["text"]  # replaced by the next index
        ds[2]
        loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate)
        batches = list(loader)
    assert sum(len(b["text"]) for b in batches) == 10
    assert all(b["pixels"].abs().max() <= 1 and b["pixels"].shape[1:] == (1, 8, 8) for b in batches)
    assert {p.rsplit("/", 1)[-1] for p in ds.skipped} == {names[2], names[5], "gone.png"}
    assert sum(names[2] in r.getMessage() for r in caplog.records) == 1  # warned once per file
    assert "3 skipped (1 missing, 2 unreadable)" in ds.report()


def test_all_corrupt_raises(tmp_path):
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n')
    (tmp_path / "a.png").write_bytes(b"junk")
    with pytest.raises(RuntimeError, match="unreadable"):
        ImageFolder(tmp_path, img_size=8, channels=1)[0]


def test_missing_or_bad_metadata_raises_helpfully(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"metadata\.jsonl.*file_name"):
        ImageFolder(tmp_path, img_size=8)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n{oops\n')
    with pytest.raises(ValueError, match=r"metadata\.jsonl:2"):
        ImageFolder(tmp_path, img_size=8)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png"}\n')
    with pytest.raises(ValueError, match="text"):
        ImageFolder(tmp_path, img_size=8)
    (tmp_path / "metadata.jsonl").write_bytes(b'{"file_name": "a.png", "text": "x"}\n{"file_name": "b.png", '
                                              b'"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"metadata\.jsonl:2: not UTF-8 .*save the file as UTF-8"):
        ImageFolder(tmp_path, img_size=8)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "half \\ud800 a pair"}\n')
    with pytest.raises(ValueError, match=r"metadata\.jsonl:1: .*lone surrogate"):
        ImageFolder(tmp_path, img_size=8)


# ---------------------------------------------------------------- aspect buckets


def test_bucket_sampler_ranks_epochs_and_coverage():
    buckets = [ASPECT_RATIOS[i % 3] for i in range(53)]
    world = 3
    samplers = [AspectBucketBatchSampler(buckets, 4, seed=7, rank=r, world_size=world) for r in range(world)]
    per_rank = [list(s) for s in samplers]
    assert [len(b) for b in per_rank] == [len(s) for s in samplers]
    flat = [i for batches in per_rank for b in batches for i in b]
    assert sorted(flat) == list(range(53))  # disjoint across ranks, everything once
    assert all(len({buckets[i] for i in b}) == 1 for batches in per_rank for b in batches)
    assert list(samplers[0]) == per_rank[0]  # same epoch, same order
    samplers[0].set_epoch(1)
    assert list(samplers[0]) != per_rank[0]

    dropped = [AspectBucketBatchSampler(buckets, 4, drop_last=True, rank=r, world_size=world) for r in range(world)]
    lists = [list(s) for s in dropped]
    assert len({len(b) for b in lists}) == 1 and len(lists[0]) == len(dropped[0])
    assert all(len(b) == 4 for batches in lists for b in batches)
    with pytest.raises(ValueError):
        AspectBucketBatchSampler(buckets, 4, rank=3, world_size=3)


def test_mix_aspect_folder_batches_stack(tmp_path):
    shapes = {"wide.png": (64, 36), "wide2.png": (160, 90), "square.png": (30, 30), "tall.png": (20, 40)}
    _write_folder(tmp_path, {n: Image.new("RGB", wh, (200, 10, 10)) for n, wh in shapes.items()})
    ds = ImageFolder(tmp_path, img_size=32, channels=3, mix_aspect=True, multiple=4)
    assert ds.buckets == ["16:9", "16:9", "1:1", "9:16"]  # 20x40: |log 0.5 - log 9/16| is smallest
    sampler = AspectBucketBatchSampler(ds.buckets, batch_size=2, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate)
    seen = 0
    for batch in loader:
        ratio = batch["aspect_ratio"][0]
        assert set(batch["aspect_ratio"]) == {ratio}
        assert batch["pixels"].shape[-2:] == aspect_to_size(ratio, 32, 4)
        seen += len(batch["text"])
    assert seen == 4
    with pytest.raises(ValueError, match="AspectBucketBatchSampler"):
        collate([ds[0], ds[2]])


def test_metadata_in_another_form_is_named_with_the_fix(tmp_path):
    from starflow.data.images import read_metadata

    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metadata.csv").write_text("file_name,text\na.png,x\n")
    with pytest.raises(FileNotFoundError, match=r"metadata.csv is there: write one metadata.jsonl in the root instead"):
        read_metadata(tmp_path / "csv")
    (tmp_path / "nested" / "part").mkdir(parents=True)
    (tmp_path / "nested" / "part" / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n')
    with pytest.raises(FileNotFoundError, match=r"part/metadata.jsonl is there"):
        read_metadata(tmp_path / "nested")
    (tmp_path / "array").mkdir()
    (tmp_path / "array" / "metadata.jsonl").write_text('[\n{"file_name": "a.png", "text": "x"}\n]\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl:1: invalid JSON .* \(a JSON array: write one object per line"):
        read_metadata(tmp_path / "array")


def test_a_panorama_is_resized_only_in_the_part_the_crop_keeps(tmp_path, monkeypatch) -> None:
    """A 60000 x 1 PNG (a few hundred bytes) cover-resized whole to 128 x 128 would be 7.7M x 128 pixels (gigabytes):
    only the part the centre crop keeps is resized. Smooth content gets the same pixels as resize-then-crop."""
    sizes = []
    resize = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, size, *a, **k: sizes.append(size) or resize(self, size, *a,
                                                                                                          **k))
    Image.new("L", (60000, 1), 200).save(tmp_path / "wide.png")
    pixels = load_image(tmp_path / "wide.png", (128, 128), 1)
    assert pixels.shape == (1, 128, 128) and sizes == [(128, 128)]
    torch.testing.assert_close(pixels, torch.full_like(pixels, 200 / 127.5 - 1))
    ramp = np.linspace(0, 255, 800)[None, :] * 0.5 + np.linspace(0, 255, 20)[:, None] * 0.5  # 40:1, smooth
    Image.fromarray(ramp.astype(np.uint8)).save(tmp_path / "ramp.png")
    whole = Image.open(tmp_path / "ramp.png").resize((640, 16), Image.Resampling.BICUBIC).crop((312, 0, 328, 16))
    expected = torch.from_numpy(np.asarray(whole, dtype=np.float32))[None] / 127.5 - 1
    torch.testing.assert_close(load_image(tmp_path / "ramp.png", (16, 16), 1), expected)
