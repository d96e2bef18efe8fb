"""LoRA fine-tuning through peft: only the adapters train, checkpoints hold only them, the merged export is a
plain official-layout model equal to the adapted one, resume reloads the base weights."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from starflow.checkpoint import load_weights, save_weights
from starflow.cli import main
from starflow.config import load_config
from starflow.models import STARFlow
from starflow.models.lora import apply_lora, merge_lora_state
from starflow.train.state import read_meta
from helpers import TINY_VIDEO, read_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def test_merged_weights_equal_the_adapted_model(make_pipeline) -> None:
    pipe = make_pipeline(std=0.2, seed=1, lora_rank=4, lora_alpha=8.0)
    model, cfg = pipe.model, pipe.config
    base = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = apply_lora(model, cfg)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    with torch.no_grad():  # B starts at zero: make the adapters do something
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    x, y = torch.randn(3, 1, 8, 8), torch.randn(3, cfg.txt_size, 32)
    merged = merge_lora_state(model.state_dict(), cfg)
    assert merged.keys() == base.keys()  # the official names again
    plain = STARFlow.from_config(cfg, txt_dim=32, vae_downsample=1)
    load_weights(plain, merged)  # strict names
    adapted, folded = model(x, y), plain(x, y)
    assert torch.allclose(adapted.z, folded.z, atol=1e-5)
    unadapted = STARFlow.from_config(cfg, txt_dim=32, vae_downsample=1)
    load_weights(unadapted, base)  # the base weights alone: the adapters' part is what the merge added
    assert (folded.z - unadapted(x, y).z).abs().max() > 1e-3
    # sampling (the KV-cached decoding path) applies the adapters too: the adapted model samples as the merged one
    model.eval()
    noise, rows = torch.randn(3, 1, 8, 8), torch.cat([y, torch.zeros_like(y)])
    for jacobi in (False, True):
        kw = dict(guidance=1.5, jacobi=jacobi, jacobi_block_size=16)
        assert torch.allclose(model.reverse(noise, rows, **kw), plain.eval().reverse(noise, rows, **kw), atol=1e-4)


def test_lora_run_trains_adapters_only_and_exports_merged(make_pipeline, tiny_config, digits, config_file,
                                                          tmp_path, capsys, monkeypatch) -> None:
    base = tmp_path / "base.safetensors"
    save_weights(make_pipeline(std=0.3, seed=2).model, base)
    monkeypatch.chdir(tmp_path)  # the base named relative to the working folder, as a user types it
    config = config_file(dict(tiny_config, init_from="base.safetensors", lora_rank=4, lora_alpha=8.0, steps=4,
                              save_freq=2, lr=1e-2))
    logdir = tmp_path / "run"
    train = ["train", "--config", str(config), "--data", str(digits["train"]), "--logdir", str(logdir),
             "--device", "cpu"]
    assert main(train) == 0
    printed = capsys.readouterr().out
    assert "LoRA rank 4, alpha 8: training" in printed and "init_from" in printed
    ckpt = read_checkpoint(logdir / "checkpoints" / "step_00000004", tmp_path)
    assert ckpt["model"] and all("lora_" in k for k in ckpt["model"])  # only the adapters are saved
    final = load_file(logdir / "model" / "model.safetensors")
    adapters = load_file(logdir / "model" / "lora.safetensors")
    start = load_file(base)
    assert final.keys() == start.keys() and adapters and all("lora_" in k for k in adapters)
    changed = [k for k in start if not torch.equal(final[k], start[k])]
    assert changed and all(".attn_blocks." in k and k.startswith("blocks.2.") for k in changed)  # the deep block
    assert load_config(logdir / "config.yaml").init_from == str(base)  # absolute: the run works from anywhere
    assert main(["export", "--merge_lora", str(logdir), str(tmp_path / "merged.safetensors")]) == 0
    merged = load_file(tmp_path / "merged.safetensors")
    assert all(torch.allclose(merged[k], final[k], atol=1e-6) for k in final)
    assert main(["export", str(logdir), str(tmp_path / "x.safetensors")]) == 2
    assert "--merge_lora" in capsys.readouterr().err
    assert main(["validate", str(config), "--checkpoint", str(logdir)]) == 1  # adapters only: said so, with the fix
    assert "holds a LoRA run's adapters" in capsys.readouterr().out
    plain = config_file(dict(tiny_config, init_from=str(logdir / "checkpoints" / "step_00000004"), steps=1),
                        name="plain.yaml")
    assert main(["train", "--config", str(plain), "--data", str(digits["train"]), "--logdir", str(tmp_path / "p"),
                 "--device", "cpu"]) == 2
    assert "merge them into their base first (starflow export --merge_lora" in capsys.readouterr().err
    assert main(["sample", "--checkpoint_path", str(logdir / "model"), "--caption", "a handwritten digit 1",
                 "--num_samples", "1", "--output_dir", str(tmp_path / "s"), "--device", "cpu"]) == 0
    # a restart resumes the adapters on top of the base weights loaded again from init_from
    longer = config_file(dict(load_config(config).to_dict(), steps=6), name="longer.yaml")
    assert main([*train[:2], str(longer), *train[3:]]) == 0
    assert "resumed from" in capsys.readouterr().out
    # the run resumed without its LoRA flags, and a full run resumed with them: each is named, with the fix
    full = config_file(dict(tiny_config, steps=8), name="full.yaml")
    assert main([*train[:2], str(full), *train[3:]]) == 2
    assert (f"is a checkpoint of a LoRA run (the adapters alone, over the base weights of its init_from), and this "
            f"run has no LoRA: resume it with its flags, --lora_rank 4 --lora_alpha 8.0 --init_from {base}") \
        in capsys.readouterr().err
    assert main([*train[:2], str(full), *train[3:6], str(tmp_path / "full"), *train[7:], "--steps", "2"]) == 0
    assert main([*train[:2], str(longer), *train[3:6], str(tmp_path / "full"), *train[7:]]) == 2
    assert "is a checkpoint of a run that trains every weight, and this run trains LoRA adapters (lora_rank 4)" \
        in capsys.readouterr().err
    with pytest.raises(ValueError, match="lora_rank' and 'ema'"):
        load_config(config, {"ema": 0.9})
    assert main(["export", "--merge_lora", "--ema", str(logdir), str(tmp_path / "e.safetensors")]) == 2
    assert "is a LoRA run, which keeps no EMA weights: drop --ema" in capsys.readouterr().err
    # the adapters belong to the base they were trained over: the same bytes rewritten pass, other weights do not
    assert read_meta(logdir / "checkpoints" / "step_00000006")["lora_base"]["files"][0].startswith("base.safetensors:")
    base.write_bytes(base.read_bytes())
    assert main(["export", "--merge_lora", str(logdir), str(tmp_path / "again.safetensors")]) == 0
    save_weights(make_pipeline(std=0.3, seed=3).model, base)
    evens = config_file(dict(load_config(config).to_dict(), steps=8), name="evens.yaml")
    for command in (["export", "--merge_lora", str(logdir), str(tmp_path / "other.safetensors")],
                    [*train[:2], str(evens), *train[3:]]):
        assert main(command) == 2
        assert f"the base weights {base} (init_from) are not the ones its LoRA adapters were trained over" \
            in capsys.readouterr().err
    base.unlink()
    assert main(["export", "--merge_lora", str(logdir), str(tmp_path / "gone.safetensors")]) == 2
    assert f"the base weights {base} (init_from) its LoRA adapters were trained over are gone" in capsys.readouterr().err


def test_lora_targets_only_the_flow_never_the_frozen_denoiser() -> None:
    """A LoRA run trains the flow's adapters; the learnable denoiser stays as loaded, so a pattern that also matches
    its layers adapts only the flow's, one that matches only its layers is refused, and its denoiser_lr is unused."""

    base = {k: v for k, v in TINY_VIDEO.items() if k != "denoiser_lr"}
    cfg = load_config(dict(base, lora_rank=2, lora_targets=r".*qkv"))
    model = STARFlow.from_config(cfg, txt_dim=32, vae_downsample=1)
    assert any(n.startswith("learnable_self_denoiser.") and n.endswith("qkv") for n, _ in model.named_modules())
    apply_lora(model, cfg)
    adapted = {n.split(".lora_")[0] for n, _ in model.named_parameters() if "lora_" in n}
    assert adapted and all(n.endswith("qkv") and not n.startswith("learnable_self_denoiser.") for n in adapted)
    only = load_config(dict(base, lora_rank=2, lora_targets=r"learnable_self_denoiser\..*qkv"))
    with pytest.raises(ValueError, match="matches only layers of the learnable denoiser, which a LoRA run does not"):
        apply_lora(STARFlow.from_config(only, txt_dim=32, vae_downsample=1), only)
    from starflow.config import inactive_keys

    assert inactive_keys(load_config(dict(TINY_VIDEO, lora_rank=2))) == {
        "denoiser_lr": "lora_rank 0 (a LoRA run keeps the learnable denoiser frozen)"}  # (noted; refused as a flag)
