"""Class-conditional models: ``text: NAME.vocab`` (one-hot labels, ``txt_size 1``), training, sampling with
``--caption CLASS`` / ``--class_id K``, guidance against the empty label, and clear errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from starflow.adapters import LabelEncoder, build_text_encoder
from starflow.cli import main
from starflow.config import load_config
from starflow.data import write_digits
from starflow.data.digits import DIGIT_NAMES

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def test_one_hot_rows_and_the_unconditional_label(tmp_path) -> None:
    (tmp_path / "c.vocab").write_text("cat\n\ndog\n")
    enc = LabelEncoder.from_file(tmp_path / "c.vocab")
    assert enc.hidden_size == 3 and enc.names == ["cat", "dog"]
    rows = enc(["dog", "", "cat"])
    assert rows.shape == (3, 1, 3)
    assert torch.equal(rows[:, 0], torch.eye(3)[[1, 2, 0]])  # the empty label is the last row
    with pytest.raises(ValueError, match=r"\['bird'\] are not classes"):
        enc(["bird", "cat"])
    (tmp_path / "d.vocab").write_text("a\na\n")
    with pytest.raises(ValueError, match="twice"):
        LabelEncoder.from_file(tmp_path / "d.vocab")
    cfg = load_config(REPO / "configs" / "demo_digits_class.yaml")
    assert build_text_encoder(cfg, REPO / "configs").names == list(DIGIT_NAMES)
    with pytest.raises(ValueError, match="txt_size: 1"):
        load_config(REPO / "configs" / "demo_digits_class.yaml", {"txt_size": 4})


def test_train_and_sample_a_class_model(tiny_config, config_file, tmp_path, capsys) -> None:
    write_digits(tmp_path / "data", captions="name")
    (tmp_path / "sub").mkdir()  # named with a folder, beside the config
    (tmp_path / "sub" / "digits.vocab").write_text((REPO / "configs" / "digits.vocab").read_text())
    config = config_file(dict(tiny_config, text="sub/digits.vocab", txt_size=1, steps=4, batch_size=8, cfg=2.0))
    logdir = tmp_path / "run"
    assert main(["train", "--config", str(config), "--data", str(tmp_path / "data" / "train"), "--logdir",
                 str(logdir), "--device", "cpu"]) == 0
    folder = logdir / "model"
    assert (folder / "digits.vocab").is_file() and load_config(folder / "config.yaml").text == "digits.vocab"
    out = tmp_path / "samples"
    assert main(["sample", "--checkpoint_path", str(folder), "--class_id", "3", "--caption", "seven",
                 "--num_samples", "1", "--output_dir", str(out), "--device", "cpu"]) == 2  # two prompt sources
    assert "--class_id and --caption both give the prompts" in capsys.readouterr().err
    assert main(["sample", "--checkpoint_path", str(folder), "--class_id", "3",
                 "--num_samples", "1", "--output_dir", str(out), "--device", "cpu"]) == 0
    assert json.loads((out / "settings.json").read_text())["captions"] == ["three"]
    assert (out / "00000_three.png").is_file()
    # starflow export of the run writes a folder as complete as the run's own: the classes travel with it (found in
    # the run's folder, where training copied them, even without its model folder)
    shutil.rmtree(folder)
    assert (logdir / "digits.vocab").is_file()
    assert main(["export", str(logdir), str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported" / "digits.vocab").is_file()
    assert main(["sample", "--checkpoint_path", str(tmp_path / "exported"), "--class_id", "3",
                 "--num_samples", "1", "--output_dir", str(tmp_path / "from_export"), "--device", "cpu"]) == 0
    assert main(["export", str(logdir), str(folder)]) == 0  # (the model folder again, for what follows)
    assert main(["sample", "--checkpoint_path", str(folder), "--caption", "seven", "--output_dir", str(out),
                 "--num_samples", "1", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["sample", "--checkpoint_path", str(folder), "--class_id", "10", "--output_dir", str(out),
                 "--device", "cpu"]) == 2
    assert "classes 0..9" in capsys.readouterr().err
    assert main(["sample", "--checkpoint_path", str(folder), "--caption", "a handwritten digit 7", "--output_dir",
                 str(tmp_path / "refused"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --caption a handwritten digit 7: ['a handwritten digit 7'] are not classes")
    assert not (tmp_path / "refused").exists()  # refused before any output
    for dry in ([], ["--dry_run"]):
        assert main(["sample", "--checkpoint_path", str(folder), "--class_id", "3", "--negative_prompt", "8",
                     "--output_dir", str(tmp_path / "refused"), "--device", "cpu", *dry]) == 2
        assert "--negative_prompt 8: ['8'] are not classes of this model" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    assert main(["sample", "--checkpoint_path", str(folder), "--caption", "three\teight", "--dry_run"]) == 0  # a class
    # and, after a TAB, the class guidance steers away from
    # a sample set: a caption that is no class is refused before the set is written, so the right one can follow
    set_args = ["generate-set", "--checkpoint_path", str(folder), "--num_samples", "2", "--out", str(tmp_path / "set"),
                "--device", "cpu"]
    assert main([*set_args, "--caption", "foo"]) == 2
    assert "--caption foo: ['foo'] are not classes of this model" in capsys.readouterr().err
    assert not (tmp_path / "set").exists()
    assert main([*set_args, "--caption", "seven"]) == 0
    # training data whose captions are not class names is refused before the first step
    write_digits(tmp_path / "sentences")
    assert main(["train", "--config", str(config), "--data", str(tmp_path / "sentences" / "train"), "--logdir",
                 str(tmp_path / "bad"), "--device", "cpu"]) == 2
    assert "a handwritten digit" in capsys.readouterr().err


def test_validate_sizes_a_class_model(capsys) -> None:
    assert main(["validate", str(REPO / "configs" / "demo_digits_class.yaml")]) == 0
    assert "text: 1 tokens x 11" in capsys.readouterr().out  # 10 classes + the unconditional row


@pytest.mark.parametrize("key", ["drop_image", "video_to_video", "last_frame_cond"])
def test_class_labels_refuse_the_caption_tags_of_video_modes(key: str) -> None:
    """'(extend) seven' is no class: a class-label video config with a mode that tags its captions is refused when
    loaded, not at the first step that tags one."""
    video = dict(img_size=8, vid_size="5:8", channel_size=1, patch_size=2, text="digits.vocab", txt_size=1)
    assert load_config(video).text == "digits.vocab"
    image = {k: v for k, v in video.items() if k != "vid_size"}  # drop_image never tags an image's caption
    assert load_config(dict(image, drop_image=0.25)).drop_image == 0.25
    with pytest.raises(ValueError, match=f"'{key}' prefixes the caption with a tag"):
        load_config(dict(video, **{key: 0.5 if key == "drop_image" else 1}))
