"""Sample-set evaluation: FID against the closed form, KID and precision/recall sanity, generate-set resume and
multi-process equality, CLIP score through a tiny random CLIP, digit features, clear errors."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
import pytest
import torch
from scipy import linalg

from starflow.assets import DEMO_DIR
from starflow.cli import main
from starflow.evaluation.generate import check_set, set_record
from starflow.evaluation.metrics import fid_from_features, kid_from_features, precision_recall
from starflow.sampling.settings import SampleSettings
from helpers import run_env

pytestmark = pytest.mark.usefixtures("one_thread")


def gaussian_features(n: int, d: int, shift: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix + shift


def test_fid_is_the_closed_form_frechet_distance() -> None:
    a, b = gaussian_features(500, 8, 0.0, 0), gaussian_features(400, 8, 0.7, 1)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    closed = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert fid_from_features(a, b) == pytest.approx(closed, rel=1e-4)
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-6)


def test_kid_and_precision_recall_on_identical_and_disjoint_sets() -> None:
    a, far = gaussian_features(300, 8, 0.0, 0), gaussian_features(300, 8, 50.0, 1)
    same, spread = kid_from_features(a, a, subset_size=100)
    assert abs(same) < 2 * spread  # zero within the spread of the subset estimates (unbiased estimator)
    shifted = kid_from_features(a, a + 1.0, subset_size=100)[0]
    assert shifted > 10 * spread and kid_from_features(a, far, subset_size=100)[0] > 1000 * shifted
    whole = kid_from_features(a, a + 1e-3, subset_size=300)  # every subset is the whole set: no spread at all
    assert whole[1] < 1e-12  # (float32 left ~1e-7 of rounding noise, as large as a near-zero KID)
    assert precision_recall(a, a) == (1.0, 1.0)
    assert precision_recall(a, far) == (0.0, 0.0)


def test_caption_digests_tell_where_the_newlines_are(tmp_path) -> None:
    settings = SampleSettings()
    one, other = set_record(["a red\ncar", "dog"], settings, 0), set_record(["a red", "car\ndog"], settings, 0)
    assert one["captions_sha"] != other["captions_sha"]
    legacy = hashlib.sha256("a red\ncar".encode()).hexdigest()[:16]  # what sets made before hold: still the same
    assert set_record(["a red", "car"], settings, 0)["captions_sha"] == legacy
    made_before = {k: v for k, v in one.items() if k != "captions_sha_legacy"}  # a caption with a newline, before
    made_before["captions_sha"] = hashlib.sha256("a red\ncar\ndog".encode()).hexdigest()[:16]
    (tmp_path / "set.json").write_text(json.dumps(made_before))
    assert check_set(tmp_path, one)  # still continues


def _generate(out: Path, n: int, nproc: int = 1, tmp: Path | None = None) -> list[str]:
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    return [*launch, "-m", "starflow.cli", "generate-set", "--checkpoint_path", str(DEMO_DIR), "--caption",
            "a handwritten digit 4", "--caption", "a handwritten digit 9", "--num_samples", str(n), "--out", str(out),
            "--sample_batch_size", "2", "--device", "cpu", "--fsdp", "0"]


def test_generate_set_resumes_after_a_kill_and_matches_on_two_processes(tmp_path, capsys) -> None:
    n = 8
    out = tmp_path / "set"
    proc = subprocess.Popen(_generate(out, n), env=run_env(tmp_path), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(list(out.glob("*.png"))) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert 3 <= len(first) < n, "the run was not interrupted part way"
    # the unfinished set is not scored as if it were the whole one
    assert main(["evaluate", "--samples", str(out), "--reference", str(out), "--metrics", "fid", "--features",
                 "digits", "--device", "cpu"]) == 2
    assert f"holds {len(first)} of the {n} images of its sample set" in capsys.readouterr().err
    assert not (out / "metrics.json").exists()
    (out / f".{n - 1:06d}.png.999999.tmp").write_bytes(b"half a PNG")  # as a kill during a write leaves it
    r = subprocess.run(_generate(out, n), env=run_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{len(first)} already there" in r.stdout
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == [f"{i:06d}.png" for i in range(n)] and not list(out.glob(".*tmp"))
    assert all(out.joinpath(k).stat().st_mtime_ns == t for k, t in first.items())  # each index written once
    captions = [json.loads(line)["caption"] for line in (out / "captions.jsonl").read_text().splitlines()]
    assert captions == ["a handwritten digit 4", "a handwritten digit 9"] * (n // 2)
    two = tmp_path / "two"
    r = subprocess.run(_generate(two, n, nproc=2), env=run_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    for name in names:
        assert (two / name).read_bytes() == (out / name).read_bytes(), name
    # files damaged after the run (a crash before the data reached the disk, a bad copy) are made again, the same
    (out / names[1]).write_bytes((out / names[1]).read_bytes()[:30])  # truncated
    (out / names[2]).write_bytes(b"")
    (out / names[3]).write_bytes(b"garbage")
    r = subprocess.run(_generate(out, n), env=run_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"3 damaged image(s) made again (empty, truncated or not a PNG), e.g. {out / names[1]}" in r.stdout
    assert f"{n - 3} already there, 3 written" in r.stdout
    for name in names:
        assert (two / name).read_bytes() == (out / name).read_bytes(), name


def test_a_set_made_before_a_setting_existed_resumes_at_its_default(tmp_path, capsys) -> None:
    out = tmp_path / "set"
    args = _generate(out, 2)[3:]  # the CLI arguments after "python -m starflow.cli"
    assert main(args) == 0
    record = json.loads((out / "set.json").read_text())
    del record["settings"]["temperature"]  # as written before the key existed
    (out / "set.json").write_text(json.dumps(record))
    capsys.readouterr()
    assert main(args) == 0 and "2 already there" in capsys.readouterr().out
    assert main([*args, "--temperature", "0.5"]) == 2
    assert "settings.temperature (1.0 -> 0.5)" in capsys.readouterr().err
    for key in ("precision", "config", "weights"):  # not recorded before they were: the set still resumes
        del record[key]
    (out / "set.json").write_text(json.dumps(record))
    assert main(args) == 0 and "2 already there" in capsys.readouterr().out

def test_a_finished_set_grows_to_the_set_made_at_once(tmp_path, capsys) -> None:
    """A larger --num_samples continues a set whose captions are the first of the new ones: its images are kept, and
    the grown set is the one a single run makes; other first captions are refused."""
    small, grown, once = (_generate(tmp_path / name, n)[3:] for name, n in (("set", 3), ("set", 5), ("once", 5)))
    assert main(small) == 0
    first = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "set").glob("*.png")}
    capsys.readouterr()
    assert main(grown) == 0 and "3 already there" in capsys.readouterr().out
    assert main(once) == 0
    names = [f"{i:06d}.png" for i in range(5)]
    assert sorted(p.name for p in (tmp_path / "set").glob("*.png")) == names
    assert all((tmp_path / "set" / n).stat().st_mtime_ns == first[n] for n in first)  # kept, not redrawn
    assert all((tmp_path / "set" / n).read_bytes() == (tmp_path / "once" / n).read_bytes() for n in names)
    for name in ("set.json", "captions.jsonl"):
        made, at_once = (json.loads((tmp_path / d / name).read_text()) if name == "set.json" else
                         (tmp_path / d / name).read_text().replace(d, "") for d in ("set", "once"))
        if name == "set.json":
            assert made["num_samples"] == 5 and made["captions_sha"] == at_once["captions_sha"]
        else:
            assert made == at_once
    captions = tmp_path / "set" / "captions.jsonl"  # a grow killed after its captions, before its set.json
    grown_captions = captions.read_text()
    captions.write_text(grown_captions + grown_captions.splitlines()[0].replace('"index": 0', '"index": 5')
                        .replace("000000.png", "000005.png") + "\n")
    assert main(grown) == 0 and "5 already there" in capsys.readouterr().out  # still the 5-image set
    assert main(_generate(tmp_path / "set", 6)[3:]) == 0 and "5 already there" in capsys.readouterr().out
    other = [a.replace("a handwritten digit 4", "a handwritten digit 7") for a in _generate(tmp_path / "set", 7)[3:]]
    assert main(other) == 2
    assert "made otherwise: num_samples (6 -> 7: a larger set grows this one only if its first captions are this " \
           "one's, captions.jsonl)" in capsys.readouterr().err


def test_a_set_made_otherwise_is_refused_before_the_weights_load(tmp_path, capsys) -> None:
    out = tmp_path / "set"
    args = _generate(out, 2)[3:]  # the CLI arguments after "python -m starflow.cli"
    assert main(args) == 0
    unloadable = tmp_path / "model"  # the demo's config with weights that would fail to load
    unloadable.mkdir()
    shutil.copy(DEMO_DIR / "config.yaml", unloadable / "config.yaml")
    shutil.copytree(DEMO_DIR / "text_encoder", unloadable / "text_encoder")
    (unloadable / "model.safetensors").write_bytes(b"not weights")
    capsys.readouterr()
    other = [str(unloadable) if a == str(DEMO_DIR) else a for a in args]
    assert main(other) == 2
    assert "holds a sample set made otherwise: checkpoint (" in capsys.readouterr().err
    for changed, what in ((["--bf16"], "precision ('fp32' -> 'bf16')"), (["--noise_std", "0.3"], "config.noise_std"),
                          (["--sample_batch_size", "3"], "settings.jacobi_auto_batch (2 -> 3: the batch size, "
                           "--sample_batch_size, for which jacobi_block_size auto picks the Jacobi chunks; the set "
                           "continues with its own, --sample_batch_size 2)")):
        assert main([*args, *changed]) == 2
        assert what in capsys.readouterr().err
    assert main([*args, "--fsdp", "1"]) == 0  # sharded or whole weights make the same images: the set continues
    # "auto" Jacobi chunks depend on the device type: a set begun on a GPU is not continued on a CPU
    record = json.loads((out / "set.json").read_text())
    assert record["auto_device"] == "cpu"
    (out / "set.json").write_text(json.dumps({**record, "auto_device": "cuda"}))
    assert main(args) == 2
    assert "auto_device ('cuda' -> 'cpu': jacobi_block_size auto picks the Jacobi chunks by the device type too" \
        in capsys.readouterr().err
    (out / "set.json").write_text(json.dumps(record))
    assert main([*args, "--jacobi_block_size", "32"]) == 2  # a fixed block size for a set made with auto
    assert "auto_device ('cpu' -> None: the set was made with --jacobi_block_size auto: continue it with auto)" \
        in capsys.readouterr().err
    staged = tmp_path / "staged"  # the same weights copied elsewhere (a requeued job staging its model): continues
    shutil.copytree(DEMO_DIR, staged)
    capsys.readouterr()
    assert main([str(staged) if a == str(DEMO_DIR) else a for a in args]) == 0
    assert "2 already there" in capsys.readouterr().out
    assert json.loads((out / "set.json").read_text())["checkpoint"] == str(staged.resolve())  # where it is now
    (out / "set.json").write_text(json.dumps(record))
    model = tmp_path / "demo"  # the same path, its weights rewritten in place
    shutil.copytree(DEMO_DIR, model)
    in_place = [str(model) if a == str(DEMO_DIR) else a for a in args]
    assert main([*in_place[:-8], "--out", str(tmp_path / "set2"), *in_place[-6:]]) == 0
    again = [*in_place[:-8], "--out", str(tmp_path / "set2"), *in_place[-6:]]
    weights = model / "model.safetensors"
    os.utime(weights, ns=(1, 1))  # rewritten with the same bytes (a finished training run run again): continues
    capsys.readouterr()
    assert main(again) == 0 and "2 already there" in capsys.readouterr().out
    assert json.loads((tmp_path / "set2" / "set.json").read_text())["weights"][0].endswith(":1")  # the new time
    config = (model / "config.yaml").read_text()  # a training key of the folder's config changes no sample
    (model / "config.yaml").write_text(config.replace("- sample_freq: 45", "- sample_freq: 7"))
    assert "- sample_freq: 7" in (model / "config.yaml").read_text()
    assert main(again) == 0 and "2 already there" in capsys.readouterr().out
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # the same size, other bytes
    weights.write_bytes(bytes(data))
    assert main(again) == 2
    assert "made otherwise: weights (" in capsys.readouterr().err
    assert main([*args[:-8], "--num_samples", "1", "--out", str(out), *args[-6:]]) == 2  # (fewer: not this set)
    err = capsys.readouterr().err  # the captions are cycled to the count, so only the count is named
    assert "made otherwise: num_samples (2 -> 1) (set.json)" in err and "captions" not in err
    stray = tmp_path / "stray"  # images without a set.json are not taken for a finished set
    stray.mkdir()
    shutil.copy(out / "000000.png", stray / "000000.png")
    assert main([*args[:-8], "--out", str(stray), *args[-6:]]) == 2
    assert "holds images (000000.png, ...) but no set.json: a sample set needs a folder" in capsys.readouterr().err
    (stray / "000000.png").rename(stray / "photo.jpg")  # a folder of real images (a test set): not written into
    assert main([*args[:-8], "--out", str(stray), *args[-6:]]) == 2
    assert "holds images (photo.jpg, ...) but no set.json" in capsys.readouterr().err
    on_out = [*args[:-8], "--out", str(out), *args[-6:]]
    (out / "set.json").write_text("[1, 2]")  # damaged
    assert main(on_out) == 2 and main(["evaluate", "--samples", str(out), "--reference", str(out), "--features",
                                       "digits"]) == 2
    assert capsys.readouterr().err.count(f"{out / 'set.json'} is damaged (not an object with a positive integer "
                                         "num_samples): restore it, or make the set again in an empty --out") == 2
    (out / "set.json").write_text("")
    (out / "captions.jsonl").write_text('{"file_name": "000000.png", "capt')  # (a write cut short)
    assert main(on_out) == 2 and "set.json is damaged (not JSON: Expecting value" in capsys.readouterr().err
    from starflow.evaluation.generate import read_set_captions

    with pytest.raises(ValueError, match=r"captions.jsonl is damaged \(line 1 is not JSON: Unterminated string"):
        read_set_captions(out)


def test_evaluate_with_digit_features_and_cached_statistics(digits, tmp_path, capsys) -> None:
    stats = tmp_path / "ref.npz"
    args = ["evaluate", "--samples", str(digits["test"]), "--reference", str(digits["train"]), "--features", "digits",
            "--metrics", "fid,kid,precision_recall", "--out", str(tmp_path / "m.json")]
    with pytest.warns(UserWarning, match="FID from 24 samples and 32 reference images, fewer than the 64 feature dimensions"):
        assert main([*args, "--save_stats", str(stats)]) == 0  # (a small set: its FID comes with a warning)
    first = json.loads((tmp_path / "m.json").read_text())
    assert set(first["metrics"]) == {"fid", "kid_mean", "kid_std", "precision", "recall"}
    assert first["samples"] == 24 and "torchmetrics" in first["versions"] and first["features"] == "digits"
    n_ref = len(list(Path(digits["train"]).glob("*.png")))
    assert first["reference_images"] == n_ref and first["kid_subset_size"] == min(24, n_ref)
    assert first["sample_set"] is None  # a plain folder of images
    with pytest.warns(UserWarning, match="FID from 24 samples"):
        assert main(["evaluate", "--samples", str(digits["test"]), "--reference", str(stats), "--features", "digits",
                     "--out", str(tmp_path / "m2.json")]) == 0
    assert json.loads((tmp_path / "m2.json").read_text())["metrics"]["fid"] == pytest.approx(first["metrics"]["fid"])
    # a run of fewer metrics into the same file keeps the others (same set, reference and features); a run against
    # another reference replaces them
    capsys.readouterr()
    assert main([*args[:-4], "--metrics", "precision_recall", "--out", str(tmp_path / "m.json")]) == 0
    assert "(kept from the earlier file)" in capsys.readouterr().out
    again = json.loads((tmp_path / "m.json").read_text())
    assert again["metrics"] == first["metrics"] and again["kept"] == ["fid", "kid_mean", "kid_std"]
    with pytest.warns(UserWarning, match="FID from 24 samples"):
        assert main([*args[:-4], "--metrics", "fid", "--out", str(tmp_path / "m.json"), "--reference", str(stats)]) == 0
    assert set(json.loads((tmp_path / "m.json").read_text())["metrics"]) == {"fid"}
    # other images in the same folder (one rewritten): the earlier values are not theirs, and are replaced
    copy = tmp_path / "copy"
    shutil.copytree(digits["test"], copy)
    ours = [*args[:-4], "--samples", str(copy), "--out", str(tmp_path / "c.json")]
    assert main([*ours, "--metrics", "precision_recall"]) == 0
    first_png = sorted(copy.glob("*.png"))[0]
    Image.open(first_png).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(first_png)
    with pytest.warns(UserWarning, match="FID from 24 samples"):
        assert main([*ours, "--metrics", "fid"]) == 0
    assert set(json.loads((tmp_path / "c.json").read_text())["metrics"]) == {"fid"}
    capsys.readouterr()
    assert main(["evaluate", "--samples", str(digits["test"]), "--metrics", "fid", "--out", str(tmp_path / "x.json")]) == 2
    assert "--reference" in capsys.readouterr().err and not (tmp_path / "x.json").exists()
    assert main(["evaluate", "--samples", str(digits["test"]), "--metrics", "clip", "--out", str(tmp_path / "x.json")]) == 2
    assert "captions.jsonl" in capsys.readouterr().err and not (tmp_path / "x.json").exists()
    # a sample folder inside the reference folder (both are listed with their subfolders): refused
    assert main([*args[:-2], "--reference", str(Path(digits["test"]).parent), "--out", str(tmp_path / "x.json")]) == 2
    assert "is inside --reference" in capsys.readouterr().err and not (tmp_path / "x.json").exists()


def test_evaluate_refuses_an_output_it_cannot_write_before_any_work(digits, tmp_path, capsys, monkeypatch) -> None:
    import starflow.evaluation.evaluate as evaluate_module
    import starflow.files

    def refused(*args, **kwargs):  # (root writes anywhere: the refusal another user gets, simulated)
        raise PermissionError(13, "Permission denied")

    featurised = []
    monkeypatch.setattr(starflow.files.tempfile, "TemporaryFile", refused)
    monkeypatch.setattr(evaluate_module, "extract_features", lambda *a, **k: featurised.append(a))
    assert main(["evaluate", "--samples", str(digits["test"]), "--reference", str(digits["train"]), "--features",
                 "digits", "--out", str(tmp_path / "m.json")]) == 2
    assert f"--out {tmp_path / 'm.json'}: cannot write in {tmp_path}" in capsys.readouterr().err and not featurised


def _tiny_clip(folder: Path) -> None:
    """A random CLIP with a character-level tokenizer, saved as a transformers folder (no download)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))  # byte-level BPE's byte -> character table (GPT-2, CLIP)
    extra = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    config = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, max_position_embeddings=77,
                                         eos_token_id=vocab["<|endoftext|>"], bos_token_id=vocab["<|startoftext|>"]),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8),
                        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    processor.save_pretrained(folder)


def test_clip_score_through_a_tiny_clip(tmp_path, capsys) -> None:
    clip = tmp_path / "clip"
    _tiny_clip(clip)
    out = tmp_path / "set"
    r = subprocess.run(_generate(out, 4), env=run_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert main(["evaluate", "--samples", str(out), "--metrics", "clip", "--clip_model", str(clip)]) == 0
    record = json.loads((out / "metrics.json").read_text())
    score = record["metrics"]["clip_score"]
    assert 0.0 <= score <= 100.0
    made = json.loads((out / "set.json").read_text())  # metrics.json names what made the set
    assert record["sample_set"]["checkpoint"] == made["checkpoint"] and record["sample_set"]["seed"] == made["seed"]
    assert record["sample_set"]["weights_sha"] == made["weights_sha"] and record["reference_images"] is None
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(clip).eval(), CLIPProcessor.from_pretrained(clip)
    files = sorted(out.glob("*.png"))
    captions = ["a handwritten digit 4", "a handwritten digit 9"] * 2
    with torch.no_grad():  # the projections by hand: pooled vision / text outputs through the projection layers
        pixels = processor(images=[Image.open(f).convert("RGB") for f in files], return_tensors="pt").pixel_values
        tokens = processor(text=captions, return_tensors="pt", padding=True)
        img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        txt = model.text_projection(model.text_model(**tokens).pooler_output)
    cos = torch.nn.functional.cosine_similarity(img, txt)
    assert score == pytest.approx(float((100 * cos.clamp(min=0)).mean()), rel=1e-4, abs=1e-4)
    from starflow.evaluation.metrics import clip_score

    long = ["a handwritten digit 4 " * 8] * 4  # 136 tokens; this tokenizer, unlike CLIP's own, sets no limit
    with torch.no_grad():
        tokens = processor(text=long, return_tensors="pt", padding=True, truncation=True, max_length=77)
        txt = model.text_projection(model.text_model(**tokens).pooler_output)
    assert tokens.input_ids.shape[1] == 77  # cut to the text model's context, not refused by it
    cos = torch.nn.functional.cosine_similarity(img, txt)
    assert clip_score(files, long, str(clip)) == pytest.approx(float((100 * cos.clamp(min=0)).mean()), rel=1e-4)
    assert main(["evaluate", "--samples", str(out), "--metrics", "clip", "--clip_model", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err
    (out / "more").mkdir()  # images in the set's folder that are not its samples are left out, with a warning
    shutil.copy(out / "000000.png", out / "more" / "copy.png")
    with pytest.warns(UserWarning, match="1 image.* not part of its sample set"):
        assert main(["evaluate", "--samples", str(out), "--metrics", "clip", "--clip_model", str(clip)]) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["samples"] == 4 and again["metrics"]["clip_score"] == score


def test_eval_nll_on_two_processes_matches_one(digits, tmp_path) -> None:
    def run(nproc: int) -> str:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] \
            if nproc > 1 else [sys.executable]
        r = subprocess.run([*launch, "-m", "starflow.cli", "eval-nll", "--checkpoint_path", str(DEMO_DIR), "--data",
                            str(digits["test"]), "--noise_samples", "2", "--num_samples", "20", "--batch_size", "8"],
                           env=run_env(tmp_path), capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        return next(line for line in r.stdout.splitlines() if line.startswith("NLL"))

    one = run(1)
    assert "±" in one and one == run(2)


def test_features_of_a_set_of_several_image_sizes(tmp_path) -> None:
    """A reference set or aspect-ratio samples mix sizes: each image is featurised at its own size (Inception
    resizes it to 299 itself), in its file order, and its feature does not depend on its batch mates."""
    from PIL import Image

    from starflow.evaluation.features import extract_features

    rng = np.random.default_rng(0)
    files = []
    for i, (w, h) in enumerate([(32, 32), (48, 24), (32, 32), (24, 48), (48, 24)]):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(files[-1])
    shapes = []

    def model(batch):  # a stand-in extractor: the mean colour and the image side, per image
        shapes.append(tuple(batch.shape))
        return torch.cat([batch.float().mean((2, 3)), torch.full((len(batch), 1), float(batch.shape[-1]))], 1)

    feats = extract_features(files, "inception", batch_size=4, extractor=(model, "RGB", None))
    pixels = [np.asarray(Image.open(f).convert("RGB"), dtype=np.float64) for f in files]
    want = np.stack([np.r_[p.mean((0, 1)), p.shape[1]] for p in pixels])
    np.testing.assert_allclose(feats, want, rtol=1e-6)
    assert len(shapes) == 4  # batch 1: three sizes; batch 2: one image


def test_evaluation_reads_images_as_shown_and_lists_gifs(tmp_path) -> None:
    """A reference photo stored sideways with an EXIF orientation tag is scored upright (as training reads it), and
    a GIF in a reference folder is one of its images, not silently left out."""
    from PIL import Image

    from starflow.evaluation.features import list_images, load_images

    upright = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    Image.fromarray(upright).save(tmp_path / "a.png")
    sideways = Image.fromarray(np.ascontiguousarray(np.rot90(upright)))  # stored turned a quarter counter-clockwise
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: turn a quarter clockwise to show
    sideways.save(tmp_path / "b.png", exif=exif)
    Image.fromarray(upright[..., 0]).save(tmp_path / "c.gif")
    assert [f.name for f in list_images(tmp_path)] == ["a.png", "b.png", "c.gif"]
    a, b, c = load_images(list_images(tmp_path), "RGB")
    assert torch.equal(a, torch.from_numpy(upright).permute(2, 0, 1)) and torch.equal(b, a)
    assert torch.equal(c[0], a[0])


def test_images_pil_refuses_are_named_as_unreadable(tmp_path, monkeypatch) -> None:
    """An image over PIL's size limit (a decompression bomb) or a float image out of range in a sample or reference
    folder is an error naming the file, not an unexpected exception."""
    from PIL import Image

    from starflow.evaluation.features import load_images

    Image.fromarray(np.full((4, 4), 3.5, np.float32)).save(tmp_path / "float.tiff")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(OSError, match=r"cannot read image .*float.tiff: float image with values in \[3.5, 3.5\]"):
        load_images([tmp_path / "float.tiff"], "RGB")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 3)  # (over twice the limit: an error, not a warning)
    with pytest.raises(OSError, match=r"cannot read image .*big.png: Image size \(4096 pixels\) exceeds limit"):
        load_images([tmp_path / "big.png"], "RGB")


def test_precision_recall_in_row_blocks_is_the_whole_matrix_result() -> None:
    """Distances taken a few rows at a time (bounded memory at 50K samples) give the whole-matrix answer, here
    on overlapping sets where precision and recall are strictly between 0 and 1, and against a brute-force count."""
    real, fake = gaussian_features(300, 8, 0.0, 0), gaussian_features(250, 8, 0.7, 1)
    whole = precision_recall(real, fake, block=10**6)
    assert 0.0 < whole[0] < 1.0 and 0.0 < whole[1] < 1.0
    assert precision_recall(real, fake, block=7) == whole == precision_recall(real, fake)
    d_rr = np.linalg.norm(real[:, None] - real[None], axis=-1)
    radii = np.sort(d_rr, axis=1)[:, 3]  # the 3rd neighbour besides the point itself
    d_fr = np.linalg.norm(fake[:, None] - real[None], axis=-1)
    assert whole[0] == pytest.approx((d_fr <= radii[None]).any(1).mean())


def test_reference_statistics_record_their_extractor(tmp_path) -> None:
    from starflow.evaluation.metrics import load_stats, save_stats

    features = np.random.default_rng(0).normal(size=(20, 4))
    path = save_stats(tmp_path / "ref.npz", features, "digits")
    assert np.array_equal(load_stats(path, "digits")["features"], features)
    with pytest.raises(ValueError, match="statistics of 'digits' features, and these are 'inception' features"):
        load_stats(path, "inception")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object))
    (tmp_path / "objects.npz").write_bytes((tmp_path / "objects.npy").read_bytes())
    with pytest.raises(ValueError, match="not a reference statistics file written by --save_stats"):
        load_stats(tmp_path / "objects.npz")
    import starflow.evaluation.metrics as metrics

    def killed(f, **arrays):  # half the file written, then the process dies
        f.write(b"PK\x03\x04 half")
        raise KeyboardInterrupt

    real_savez = np.savez
    np.savez = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            metrics.save_stats(tmp_path / "ref.npz", features[:5], "digits")
    finally:
        np.savez = real_savez
    assert np.array_equal(load_stats(path, "digits")["features"], features)  # the old file, untouched
    assert sorted(p.name for p in tmp_path.glob("*ref*")) == ["ref.npz"]
    assert save_stats(tmp_path / "plain", features).name == "plain.npz"  # np.savez's naming


def test_inception_features_use_the_original_fid_resize(tmp_path, monkeypatch) -> None:
    """FID's Inception sees images resized to 299 as TensorFlow 1 did (TTUR, torch-fidelity, the papers), not with
    torchmetrics' default antialiased resize; Inception statistics record that and older ones are refused."""
    import torchmetrics.image.fid as tm_fid
    import torchmetrics.utilities.imports as tm_imports

    from starflow.evaluation.features import INCEPTION_RESIZE, build_extractor
    from starflow.evaluation.metrics import load_stats, save_stats

    made = {}

    class Inception(torch.nn.Module):  # records how the extractor is built (torch-fidelity is not installed here)
        def __init__(self, name, features_list, feature_extractor_weights_path=None, antialias=True) -> None:
            super().__init__()
            made.update(name=name, features_list=features_list, antialias=antialias)

    class Before18(torch.nn.Module):  # torchmetrics < 1.8: no antialias flag, and the TF1 resize always
        def __init__(self, name, features_list, feature_extractor_weights_path=None) -> None:
            super().__init__()

    monkeypatch.setattr(tm_imports, "_TORCH_FIDELITY_AVAILABLE", True)
    monkeypatch.setattr(tm_fid, "NoTrainInceptionV3", Before18)
    assert isinstance(build_extractor("inception")[0], Before18)
    monkeypatch.setattr(tm_fid, "NoTrainInceptionV3", Inception)
    model, mode, size = build_extractor("inception")
    assert isinstance(model, Inception) and (mode, size) == ("RGB", None)
    assert made == {"name": "inception-v3-compat", "features_list": ["2048"], "antialias": False}
    features = np.random.default_rng(0).normal(size=(20, 4))
    path = save_stats(tmp_path / "ref.npz", features, "inception")
    assert str(load_stats(path, "inception")["resize"]) == INCEPTION_RESIZE == "tf1-bilinear"
    with np.load(path) as data:
        older = {k: data[k] for k in data.files if k != "resize"}
    np.savez(tmp_path / "older.npz", **older)
    with pytest.raises(ValueError, match="resized to 299 another way .* remake them with --save_stats"):
        load_stats(tmp_path / "older.npz", "inception")
    np.savez(tmp_path / "oldest.npz", **{k: v for k, v in older.items() if k != "extractor"})  # (no extractor either)
    with pytest.raises(ValueError, match="resized to 299 another way"):
        load_stats(tmp_path / "oldest.npz", "inception")


def test_generate_set_stopped_by_sigterm_says_how_to_resume(tmp_path) -> None:
    out = tmp_path / "set"
    proc = subprocess.Popen(_generate(out, 400), env=run_env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(list(out.glob("*.png"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    stopped = re.search(r"stopped by SIGTERM after (\d+) of the 400 samples of this run: rerun the same command to "
                        r"resume \(from the samples already written\)", err)
    assert stopped, err[-2000:]
    # the batch in progress was finished: every sample the message counts is a complete file, and no temporary one
    assert len(list(out.glob("*.png"))) == int(stopped.group(1)) < 400
    assert not list(out.glob(".*.tmp"))


def test_generate_set_refuses_a_caption_file_with_sample_negative_prompts(tmp_path, capsys) -> None:
    """``prompt<TAB>negative`` lines are ``sample``'s; a set would have taken the whole line as the caption."""
    captions = tmp_path / "captions.txt"
    captions.write_text("a handwritten digit 3\na handwritten digit 3\ta handwritten digit 8\n")
    assert main(["generate-set", "--caption_file", str(captions), "--num_samples", "2", "--out", str(tmp_path / "set"),
                 "--device", "cpu"]) == 2
    assert f"--caption_file {captions}: the caption 'a handwritten digit 3\\ta handwritten digit 8' holds a tab" \
        in capsys.readouterr().err
    assert not (tmp_path / "set").exists()
    assert main(["generate-set", "--caption", "a\tb", "--num_samples", "1", "--out", str(tmp_path / "set"),
                 "--device", "cpu"]) == 2
    assert "--caption: the caption 'a\\tb' holds a tab" in capsys.readouterr().err


def test_sets_of_different_seeds_share_no_noise_and_older_sets_keep_theirs(tmp_path, capsys) -> None:
    """Image i of a set gets a seed hashed from --seed and i: the set of seed 2 is not the set of seed 0 shifted by
    two images, as it was with seed + i (mean and spread over seeds would score one set). A set made before (no
    "seeding" in its set.json) continues with seed + i."""
    def make(out: Path, seed: int) -> dict[str, bytes]:
        argv = _generate(out, 4)[3:]  # (in process: after "python -m starflow.cli")
        assert main([*argv, "--seed", str(seed)]) == 0, capsys.readouterr().err
        return {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}

    a, b = make(tmp_path / "a", 0), make(tmp_path / "b", 2)
    assert json.loads((tmp_path / "a" / "set.json").read_text())["seeding"] == "hashed"
    assert not set(a.values()) & set(b.values())
    older = {}
    for seed in (0, 2):  # sets made before: their set.json without "seeding", images still to make
        out = tmp_path / f"old{seed}"
        make(out, seed)
        record = json.loads((out / "set.json").read_text())
        del record["seeding"]
        (out / "set.json").write_text(json.dumps(record))
        for png in out.glob("*.png"):
            png.unlink()
        older[seed] = make(out, seed)
        assert "seeding" not in json.loads((out / "set.json").read_text())
    assert older[2]["000000.png"] == older[0]["000002.png"]  # seed + i: caption "4" with seed 2 in both
    assert older[0]["000001.png"] != a["000001.png"]


def test_kid_of_equal_sets_within_one_subset_warns_that_its_std_is_empty() -> None:
    """With as many samples as reference images, at most the subset size, every KID subset is both whole sets: the
    std printed beside the mean is ~0 and measures nothing, which is said; unequal sets draw varying subsets."""
    from starflow.evaluation.evaluate import _distribution_metrics

    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(40, 8)), rng.normal(size=(40, 8)) + 0.1
    with pytest.warns(UserWarning, match="subsets .* are the whole sets, so kid_std is ~0"):
        results = _distribution_metrics(["kid"], real, fake, "ref", "digits", "cpu")
    assert results["kid_std"] < 1e-9
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _distribution_metrics(["kid"], real, fake[:30], "ref", "digits", "cpu")["kid_std"] > 1e-6
