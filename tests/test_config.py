"""The official YAML configs load unchanged; bad keys and values raise ValueError naming the key (SPEC section 1)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from starflow.adapters.geometry import vae_geometry
from starflow.config import Config, apply_overrides, load_config, save_config

REPO = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(os.environ.get("STARFLOW_REFERENCE_DIR", REPO.parent / "shared" / "reference"))
T2I = REPO / "configs" / "starflow_3B_t2i_256x256.yaml"
T2V = REPO / "configs" / "starflow-v_7B_t2v_caus_480p.yaml"


@pytest.mark.parametrize("path", [T2I, T2V], ids=["t2i", "t2v"])
def test_repo_configs_are_the_official_files(path: Path) -> None:
    official = REFERENCE_DIR / "official_configs" / path.name
    if not official.is_file():
        pytest.skip(f"{official} not found (set STARFLOW_REFERENCE_DIR)")
    assert path.read_bytes() == official.read_bytes()


def test_official_t2i_config() -> None:
    cfg = load_config(T2I)
    assert cfg.layers_per_block == [2, 2, 2, 2, 2, 24] and cfg.num_blocks == 6 and cfg.blocks == 6
    assert (cfg.channels, cfg.deep_channels, cfg.head_dim, cfg.patch_size, cfg.channel_size) == (3072, 3072, 64, 1, 4)
    assert (cfg.img_size, cfg.txt_size, cfg.noise_std, cfg.cfg, cfg.soft_clip) == (256, 128, 0.3, 2.5, 4.0)
    assert cfg.rope and cfg.sos and cfg.use_softplus and cfg.cond_top_only and cfg.use_final_norm
    assert cfg.seq_order == "L2R" and cfg.pt_seq_len is None and cfg.vid_size is None and not cfg.is_video
    assert cfg.vae == "stabilityai/sd-vae-ft-ema" and vae_geometry(cfg.vae).downsample == 8 and cfg.latent_size(8) == 32
    assert cfg.text == "google/flan-t5-xl" and cfg.latent_norm_regularization == 1e-4 and cfg.lr == 6.4e-5


def test_official_t2v_config() -> None:
    cfg = load_config(T2V)
    assert cfg.block_layers == [2, 2, 2, 2, 2, 24] and cfg.num_blocks == 6
    assert (cfg.channels, cfg.deep_channels, cfg.channel_size, cfg.patch_size) == (3072, 4096, 48, 1)
    assert cfg.vid_size == (81, 16) and cfg.is_video and cfg.img_size == 640 and cfg.txt_size == 256
    assert cfg.vae == "Wan-AI/Wan2.2-TI2V-5B-Diffusers:0.6" and vae_geometry(cfg.vae).downsample == 16
    assert cfg.finetuned_vae is None  # 'none' in the YAML
    assert (cfg.temporal_causal, cfg.denoiser_window, cfg.pt_seq_len, cfg.noise_std) == (2, 10, 32, 0.5)
    assert cfg.learnable_self_denoiser and cfg.conditional_denoiser and cfg.shallow_block_local and cfg.fps_cond
    assert cfg.cond_noise_level and cfg.mix_aspect and cfg.drop_image == 0.25 and cfg.lr == 5e-5


def test_defaults_are_the_official_parsers() -> None:
    cfg = Config()
    assert (cfg.channel_size, cfg.img_size, cfg.patch_size, cfg.channels, cfg.blocks) == (3, 32, 4, 512, 4)
    assert cfg.layers_per_block == [8] and cfg.block_layers == [8] * 4 and cfg.head_dim == 64
    assert cfg.top_block_channels is None and cfg.deep_channels == 512 and cfg.seq_order == "R2L"
    assert not (cfg.rope or cfg.sos or cfg.use_softplus or cfg.cond_top_only or cfg.use_final_norm)
    assert (cfg.soft_clip, cfg.txt_size, cfg.noise_std, cfg.cfg, cfg.lr, cfg.min_lr) == (0, 0, 0.3, 0, 1e-4, 1e-6)
    assert load_config({}) == cfg


def test_plain_mapping_and_overrides() -> None:
    raw = {"layers_per_block": "1 2 3", "rope": "1", "vid_size": "17:8", "vae": "none", "txt_size": 8}
    cfg = load_config(raw, {"cfg": 3.6})
    assert cfg.layers_per_block == [1, 2, 3] and cfg.num_blocks == 3 and cfg.rope is True
    assert cfg.vid_size == (17, 8) and cfg.vae is None and cfg.cfg == 3.6
    assert apply_overrides(load_config(T2I), {"cfg": 3.6, "lr": None}).cfg == 3.6  # CLI > YAML; None = unset


@pytest.mark.parametrize("typo, nearest", [("layers_per_blok", "layers_per_block"), ("noise_sdt", "noise_std")])
def test_unknown_key_names_the_nearest(typo: str, nearest: str) -> None:
    with pytest.raises(ValueError, match=f"'{typo}'.*'{nearest}'"):
        load_config({typo: 1})


@pytest.mark.parametrize("key, value", [("channels", "wide"), ("rope", 2), ("noise_std", "nan"),
                                        ("layers_per_block", "2 x"), ("vid_size", "81"), ("img_size", 1.5)])
def test_ill_typed_value_names_the_key(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"'{key}'"):
        load_config({key: value})


def test_bad_seq_order() -> None:
    with pytest.raises(ValueError, match="seq_order"):
        load_config({"seq_order": "T2B"})


def test_blocks_contradict_layers_per_block() -> None:
    with pytest.raises(ValueError, match="'blocks'.*'layers_per_block'"):
        load_config({"blocks": 4, "layers_per_block": "2 2 24"})
    assert load_config({"blocks": 3, "layers_per_block": "2 2 24"}).num_blocks == 3
    # an override of the layers: a new list decides the block count, one number keeps the file's 'blocks'
    assert load_config({"blocks": 6, "layers_per_block": 2}, {"layers_per_block": "3"}).block_layers == [3] * 6
    assert load_config({"blocks": 6, "layers_per_block": 2}, {"layers_per_block": "3 3"}).block_layers == [3, 3]


def test_yaml_aliases_are_refused_before_they_expand(tmp_path: Path) -> None:
    """Nested aliases of a few hundred bytes expand to gigabytes when an error message prints the value; a config is
    plain keys and values, so an alias is refused where it stands."""
    levels = ["a0: &a0 [" + ", ".join(["1"] * 10) + "]"]
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    (tmp_path / "aliases.yaml").write_text("\n".join(levels) + "\nlayers_per_block: *a8\n")
    with pytest.raises(ValueError, match=r"aliases.yaml: not a readable YAML file at line 2 \(a YAML alias"):
        load_config(tmp_path / "aliases.yaml")


def test_a_key_given_twice_in_a_yaml_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "plain.yaml").write_text("lr: 0.1\nlr: 0.05\n")  # (PyYAML would keep the last one silently)
    (tmp_path / "official.yaml").write_text("arguments:\n  - lr: 0.1\n  - lr: 0.05\n")
    with pytest.raises(ValueError, match="config key 'lr' is given twice"):
        load_config(tmp_path / "plain.yaml")
    with pytest.raises(ValueError, match=r"config key 'lr' is given twice \(0.1 and 0.05\); keep one"):
        load_config(tmp_path / "official.yaml")
    assert load_config({"blocks": 5, "layers_per_block": "2"}).block_layers == [2] * 5


@pytest.mark.parametrize("raw, key", [({"channels": 100, "head_dim": 64}, "channels"),
                                      ({"cfg": 2.0}, "cfg"), ({"drop_label": 1.5}, "drop_label"),
                                      ({"conditional_denoiser": 1}, "conditional_denoiser")])
def test_contradictions_name_the_key(raw: dict, key: str) -> None:
    with pytest.raises(ValueError, match=f"'{key}'"):
        load_config(raw)


def test_missing_file() -> None:
    with pytest.raises(FileNotFoundError, match="configs/"):
        load_config(REPO / "configs" / "no_such_config.yaml")


@pytest.mark.parametrize("path", [T2I, T2V], ids=["t2i", "t2v"])
def test_save_config_round_trip(path: Path, tmp_path: Path) -> None:
    cfg = load_config(path)
    out = tmp_path / "config.yaml"
    save_config(cfg, out)
    assert out.read_text().startswith("arguments:")
    assert load_config(out) == cfg


def _attributes_read(paths: list[Path]) -> set[str]:
    """Attribute names read in ``paths``, but a command's own flags (``args.X``) and module paths (``starflow.X``)."""
    import ast

    def root(node: ast.expr) -> str:
        while isinstance(node, ast.Attribute):
            node = node.value
        return node.id if isinstance(node, ast.Name) else ""

    return {node.attr for p in paths for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, ast.Attribute) and root(node) not in ("args", "starflow")}


def test_training_keys_are_read_by_training_and_not_by_sampling() -> None:
    """The ``training=True`` marking decides which flags the sampling commands refuse: a marked key must be one the
    training code reads (else `starflow train` would accept and ignore it), and one sampling never reads (else the
    refused flag would be a knob that works). Two exceptions read a model's own value from its config: ``drop_image``
    (sampling: whether a video model learned the '(extend)' prompt) and ``noise_type`` (eval-nll: the noise of the
    data whose likelihood the flow gives)."""
    from starflow.config import TRAINING_KEYS

    pkg = Path(__file__).resolve().parents[1] / "starflow"
    training = _attributes_read([*(pkg / "train").rglob("*.py"), *(pkg / "data").rglob("*.py"),
                                 *(pkg / "models").rglob("*.py"), pkg / "cli" / "train.py"])
    sampling = _attributes_read([*(pkg / "sampling").rglob("*.py"), *(pkg / "evaluation").rglob("*.py"),
                                 pkg / "cli" / "sample.py", pkg / "cli" / "edit.py", pkg / "cli" / "evaluate.py"])
    assert {"lr", "steps", "logdir", "precision", "data"} <= TRAINING_KEYS
    assert not TRAINING_KEYS & {"cfg", "temperature", "txt_size", "img_size", "seed", "ema", "vae", "text"}
    assert sorted(TRAINING_KEYS - training) == []
    assert sorted(TRAINING_KEYS & sampling) == ["drop_image", "noise_type"]


@pytest.mark.parametrize("key, meant", [("learning_rate", "lr"), ("resume_path", "init_from"), ("acc", "grad_accum"),
                                        ("nosie_std", "noise_std")])
def test_an_unknown_key_names_the_key_meant(key: str, meant: str) -> None:
    """Other codebases' names (the official scripts' flags written as YAML keys among them) and typos get a hint."""
    with pytest.raises(ValueError, match=f"unknown config key '{key}'; did you mean '{meant}'"):
        load_config({key: 1})


@pytest.mark.parametrize("blocks", [0, -1])
def test_a_config_without_flow_blocks_is_refused(blocks: int) -> None:
    with pytest.raises(ValueError, match=f"config key 'blocks' must be >= 1 \\(the deep block at least\\), got {blocks}"):
        load_config({"blocks": blocks})
