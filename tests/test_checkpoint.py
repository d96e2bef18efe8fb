"""Weights I/O in the official layout: deprecated buffers, layout errors, meta-device loading, formats, damage."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from starflow.checkpoint import (
    DEPRECATED_BUFFERS, CheckpointError, LayoutError, compare_layout, convert_checkpoint, drop_deprecated,
    load_weights, read_state_dict, save_weights,
)
from starflow.models import STARFlow

TXT_DIM = 8
CONFIG = dict(channel_size=2, img_size=4, patch_size=1, channels=32, head_dim=16, layers_per_block=[1, 2], rope=1,
              sos=1, txt_size=3, cond_top_only=1, use_softplus=1, use_final_norm=1, soft_clip=4.0, seq_order="L2R")
DEPRECATED = {"var": (4, 2), "blocks.0.attn_mask": (16, 16), "blocks.1.attn_mask": (19, 19),
              "feat_rope.freqs_cos": (19, 8), "feat_rope.freqs_sin": (19, 8)}


def build(seed: int | None = 0) -> STARFlow:
    """A tiny model; with a seed, random weights with non-zero output layers (not the identity)."""
    torch.manual_seed(seed or 0)
    model = STARFlow.from_config(CONFIG, txt_dim=TXT_DIM).eval()
    if seed is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "proj_out.weight" in name or "final_norm.weight" in name:
                    p.add_(0.1 * torch.randn_like(p))
    return model


def official_state_dict(model: STARFlow) -> dict[str, torch.Tensor]:
    """The model's weights plus the official deprecated buffers."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    return {**sd, **{k: torch.randn(shape) for k, shape in DEPRECATED.items()}}


def outputs(model: STARFlow) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 2, 4, 4, generator=g), torch.randn(2, 3, TXT_DIM, generator=g)
    with torch.no_grad():
        return model(x, y).z


def snapshot(model: STARFlow) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_drop_deprecated() -> None:
    sd = {"var": 0, "blocks.12.attn_mask": 0, "feat_rope.freqs_cos": 0, "feat_rope.freqs_sin": 0,
          "blocks.0.proj_in.weight": 0, "blocks.x.attn_mask": 0, "variance": 0, "blocks.1.attn_mask.extra": 0}
    assert set(drop_deprecated(sd)) == {"blocks.0.proj_in.weight", "blocks.x.attn_mask", "variance",
                                        "blocks.1.attn_mask.extra"}
    assert "var" in DEPRECATED_BUFFERS and "blocks.{i}.attn_mask" in DEPRECATED_BUFFERS


def test_load_with_deprecated_buffers() -> None:
    source, target = build(0), build(1)
    assert load_weights(target, official_state_dict(source)) is target
    assert_same_weights(target.state_dict(), source.state_dict())
    torch.testing.assert_close(outputs(target), outputs(source), rtol=0, atol=0)


def test_every_layout_difference_in_one_error_report() -> None:
    model = build(0)
    before = snapshot(model)
    sd = official_state_dict(build(1))
    del sd["blocks.0.proj_in.bias"], sd["blocks.1.attn_blocks.1.mlp.norm.weight"]
    sd["blocks.0.extra.weight"] = torch.zeros(3)
    sd["blocks.1.proj_out.weight"] = torch.zeros(5, 32)
    with pytest.raises(LayoutError) as info:
        load_weights(model, sd)
    message, report = str(info.value), info.value.report.describe()
    assert "\n" not in message and "2 missing, 1 unexpected, 1 mismatched" in message  # one line, the first of each
    assert "e.g. missing blocks.0.proj_in.bias; unexpected blocks.0.extra.weight; blocks.1.proj_out.weight" in message
    for name in ("blocks.0.proj_in.bias", "blocks.1.attn_blocks.1.mlp.norm.weight", "blocks.0.extra.weight",
                 "blocks.1.proj_out.weight: model [4, 32], checkpoint [5, 32]",
                 "2 missing, 1 unexpected, 1 mismatched"):
        assert name in report  # every difference
    assert "var" not in info.value.report.unexpected  # deprecated buffers are never reported
    assert isinstance(info.value, CheckpointError) and isinstance(info.value, ValueError)
    assert_same_weights(model.state_dict(), before)  # untouched
    with pytest.raises(LayoutError, match="mismatched"):  # shapes are checked even when not strict
        load_weights(model, sd, strict=False)
    assert_same_weights(model.state_dict(), before)


def test_long_listings_are_truncated_with_counts() -> None:
    model = build(0)
    report = compare_layout(model, {"blocks.0.proj_in.weight": (32, 2)})
    total = len(model.state_dict())
    assert len(report.missing) == total - 1 and not report.ok
    message = report.describe(limit=5)
    assert f"{total - 1} missing" in message and f"... and {total - 1 - 5} more" in message
    assert message.count("\n") < 10


def test_non_strict_load_keeps_missing_parameters() -> None:
    source, target = build(0), build(1)
    sd = official_state_dict(source)
    kept = sd.pop("blocks.0.proj_in.weight")
    sd["unused.weight"] = torch.zeros(1)
    before = target.blocks[0].proj_in.weight.clone()
    load_weights(target, sd, strict=False)
    assert torch.equal(target.blocks[0].proj_in.weight, before) and not torch.equal(before, kept)
    assert torch.equal(target.blocks[1].proj_in.weight, source.blocks[1].proj_in.weight)


def test_compare_layout_on_meta_model_and_shape_tables() -> None:
    with torch.device("meta"):
        meta = build(None)
    shapes = {k: list(v.shape) for k, v in build(0).state_dict().items()}
    assert compare_layout(meta, shapes).ok
    assert compare_layout(shapes, {k: tuple(v) for k, v in shapes.items()}).ok
    shapes["blocks.0.proj_in.weight"] = [1, 2]
    assert compare_layout(meta, shapes).mismatched == [("blocks.0.proj_in.weight", (32, 2), (1, 2))]


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_meta_device_assign_load(tmp_path: Path, suffix: str) -> None:
    source = build(0)
    path = save_weights(official_state_dict(source), tmp_path / f"weights{suffix}")
    with torch.device("meta"):
        model = build(None)
    assert model.blocks[0].proj_in.weight.is_meta
    load_weights(model, path, assign=True)
    assert not any(t.is_meta for t in model.state_dict().values())
    assert all(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(outputs(model), outputs(source), rtol=0, atol=0)


def test_assign_uses_the_loaded_tensors_without_copying(tmp_path: Path) -> None:
    path = save_weights(build(0), tmp_path / "weights.pth")
    sd = read_state_dict(path)  # memory-mapped
    with torch.device("meta"):
        model = build(None)
    load_weights(model, sd, assign=True)
    assert all(t.data_ptr() == sd[k].data_ptr() for k, t in model.state_dict().items())


@pytest.mark.parametrize("assign", [False, True])
def test_load_with_dtype(assign: bool) -> None:
    source, target = build(0), build(1)
    load_weights(target, official_state_dict(source), dtype=torch.bfloat16, assign=assign)
    assert all(p.dtype == torch.bfloat16 for p in target.parameters())
    assert torch.equal(target.blocks[0].proj_in.weight, source.blocks[0].proj_in.weight.bfloat16())


def test_wrapped_and_prefixed_checkpoints(tmp_path: Path) -> None:
    source = build(0)
    sd = official_state_dict(source)
    torch.save({"model": {f"module._orig_mod.{k}": v for k, v in sd.items()}, "step": 10}, tmp_path / "train.pt")
    with pytest.warns(UserWarning, match=r"weights under 'model'; its other entries \(step\) are not model weights"):
        assert read_state_dict(tmp_path / "train.pt").keys() == sd.keys()
    name = next(iter(sd))
    torch.save({f"module.{name}": sd[name], name: sd[name]}, tmp_path / "both.pth")  # two entries, one name
    with pytest.raises(CheckpointError, match=f"'module.{name}' and '{name}' are both '{name}'"):
        read_state_dict(tmp_path / "both.pth")
    torch.save({"state_dict": sd, "optimizer": {}}, tmp_path / "lightning.pth")
    with pytest.warns(UserWarning, match=r"other entries \(optimizer\)"):
        model = load_weights(build(1), tmp_path / "lightning.pth")
    assert_same_weights(model.state_dict(), source.state_dict())


def test_legacy_torch_format_loads(tmp_path: Path) -> None:
    sd = official_state_dict(build(0))
    torch.save(sd, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)  # cannot be memory-mapped
    assert_same_weights(read_state_dict(tmp_path / "legacy.pth"), sd)


@pytest.mark.parametrize("first, second", [(".pth", ".safetensors"), (".safetensors", ".pth")])
def test_conversion_round_trip(tmp_path: Path, first: str, second: str) -> None:
    sd = official_state_dict(build(0))
    src = save_weights(sd, tmp_path / f"a{first}")
    dst = convert_checkpoint(src, tmp_path / f"b{second}")
    back = convert_checkpoint(dst, tmp_path / f"c{first}")
    for path in (src, dst, back):
        assert_same_weights(read_state_dict(path), sd)  # every name kept, deprecated buffers included
    half = read_state_dict(convert_checkpoint(src, tmp_path / f"d{second}", dtype=torch.bfloat16))
    assert half.keys() == sd.keys() and all(v.dtype == torch.bfloat16 for v in half.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"a{first}", f"b{second}", f"c{first}", f"d{second}"]


def test_save_overwrites_atomically_and_handles_shared_tensors(tmp_path: Path) -> None:
    weight = torch.randn(4, 4)
    sd = {"a": weight, "b": weight, "c": weight[1:].t()}  # shared storage and a non-contiguous view
    path = tmp_path / "shared.safetensors"
    path.write_bytes(b"old")
    save_weights(sd, path)
    assert_same_weights(read_state_dict(path), {k: v.contiguous() for k, v in sd.items()})
    assert [p.name for p in tmp_path.iterdir()] == ["shared.safetensors"]
    with pytest.raises(ValueError, match="format"):
        save_weights(sd, tmp_path / "weights.npz")


def test_a_save_removes_what_killed_saves_of_the_file_left(tmp_path: Path) -> None:
    """A killed write leaves its temporary folder (with the safetensors writer's own ``.tmpXXXXXX`` in it: gigabytes
    for a 3B model); the next save of that file removes it, but not the write in progress of a running process."""
    import os

    dead = 2**22 + 12345  # above Linux's default pid_max: no such process
    import socket

    killed = tmp_path / f".model.safetensors.tmp{dead}@{socket.gethostname()}"
    killed.mkdir()
    (killed / ".tmpAbC123").write_bytes(b"x" * 1000)
    (tmp_path / f".model.safetensors.tmp{dead + 1}").write_bytes(b"half")  # an older version's temporary file
    running = tmp_path / f".model.safetensors.tmp{os.getppid()}@{socket.gethostname()}"
    running.mkdir()
    elsewhere = tmp_path / f".model.safetensors.tmp{dead}@another-host"  # its processes cannot be seen from here
    elsewhere.mkdir()
    other = tmp_path / f".ema.safetensors.tmp{dead}"
    other.mkdir()
    save_weights({"a": torch.ones(2)}, tmp_path / "model.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([running.name, elsewhere.name, other.name,
                                                                 "model.safetensors"])


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file_raises_and_leaves_the_model_unchanged(tmp_path: Path, suffix: str) -> None:
    path = save_weights(official_state_dict(build(0)), tmp_path / f"weights{suffix}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    model = build(1)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match="corrupt or incomplete") as info:
        load_weights(model, path)
    assert str(path) in str(info.value) and "download" in str(info.value)
    assert_same_weights(model.state_dict(), before)


def test_missing_file_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_weights(build(0), tmp_path / "starflow_3B_t2i_256x256.pth")
    message = str(info.value)
    assert "starflow_3B_t2i_256x256.pth" in message and "apple/starflow" in message


class NotATensor:
    pass


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    torch.save({"weight": torch.zeros(1), "obj": NotATensor()}, tmp_path / "unsafe.pth")
    with pytest.raises(CheckpointError, match=r"holds Python objects besides tensors \(it names [\w.]*NotATensor\), "
                                              "which loading could run as code"):
        read_state_dict(tmp_path / "unsafe.pth")
    (tmp_path / "garbage.pth").write_bytes(b"\x80\x02garbage, not a pickle")  # damage, not objects
    with pytest.raises(CheckpointError, match="the file is corrupt or incomplete .*download it again"):
        read_state_dict(tmp_path / "garbage.pth")
    torch.save({"weight": torch.zeros(1), "step": 3}, tmp_path / "state.pth")
    with pytest.raises(CheckpointError, match="not a state dict"):
        read_state_dict(tmp_path / "state.pth")


def test_full_state_dict_loads_by_name_and_refuses_what_does_not_fit() -> None:
    """``load_full_state_dict`` (the loader of sharded sampling and ``--init_from``) on an unsharded model:
    values copied in the model's dtype, other names untouched, unknown names and wrong shapes refused."""
    from starflow.distributed import load_full_state_dict

    source, target = build(0), build(1).to(torch.bfloat16)
    untouched = target.blocks[1].proj_in.weight.clone()
    weights = {k: v for k, v in source.state_dict().items() if not k.startswith("blocks.1.")}
    load_full_state_dict(target, weights)
    got = target.state_dict()
    assert all(torch.equal(got[k], v.bfloat16()) for k, v in weights.items() if v.is_floating_point())
    assert torch.equal(target.blocks[1].proj_in.weight, untouched)
    with pytest.raises(KeyError, match="the model has no blocks.9.x"):
        load_full_state_dict(target, {"blocks.9.x": torch.zeros(1)})
    name = "blocks.0.proj_in.weight"
    with pytest.raises(ValueError, match=f"{name}: \\(1, 2\\) in the checkpoint"):
        load_full_state_dict(target, {name: torch.zeros(1, 2)})


def test_saved_weights_files_follow_the_umask(tmp_path: Path) -> None:
    """safetensors' writer creates owner-only files; exported weights are readable as any other file the user writes."""
    import os

    old = os.umask(0o022)
    try:
        for name in ("w.safetensors", "w.pth"):
            path = save_weights({"w": torch.zeros(2)}, tmp_path / name)
            assert path.stat().st_mode & 0o777 == 0o644, name
    finally:
        os.umask(old)
    if Path("/proc/self").is_dir():  # a folder no one can create files in (Linux)
        with pytest.raises(OSError, match="cannot write /proc/x.safetensors"):
            save_weights({"w": torch.zeros(2)}, "/proc/x.safetensors")
