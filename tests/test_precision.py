"""``precision`` (config key): bf16 autocast (the official recipe) or float32 training, on CUDA and on a CPU.

On a CPU the bf16 step computes its linear layers in bf16 and its attention in float32
(:func:`starflow.models.layers.attend`), and the flow's scale, shift and log-determinant stay float32.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from starflow.cli import main
from starflow.config import load_config
from starflow.models import STARFlow
from starflow.models.layers import attend
from starflow.train.parallelize import training_dtype


class DtypeLog(TorchDispatchMode):
    """Counts ``(op, input dtypes)`` of the matmuls and the attention kernels that run inside it."""

    OPS = ("aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm", "aten._scaled_dot_product_flash_attention_for_cpu",
           "aten._scaled_dot_product_flash_attention_for_cpu_backward")

    paused = False  # set while the frozen text encoder runs (it is outside autocast, in float32)

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in self.OPS and not DtypeLog.paused:
            floats = (a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
            dtypes = tuple(sorted({str(a.dtype) for a in floats}))
            self.seen[(name.split(".")[-1], dtypes)] += 1
        return func(*args, **(kwargs or {}))


def test_training_dtype_follows_the_key_and_the_device() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert training_dtype("auto", cpu) == torch.float32
    assert training_dtype("auto", cuda) == torch.bfloat16  # the official recipe on GPUs
    assert training_dtype("bf16", cpu) == training_dtype("bf16", cuda) == torch.bfloat16
    assert training_dtype("fp32", cuda) == torch.float32
    with pytest.raises(ValueError, match="precision"):
        training_dtype("fp16", cpu)


def test_a_cpu_without_native_bf16_is_named(tiny_config, digits, config_file, tmp_path, monkeypatch, capsys) -> None:
    from starflow.train.parallelize import native_bf16

    assert native_bf16(torch.device("cuda"))
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not native_bf16(torch.device("cpu"))
    config = config_file(dict(tiny_config, steps=1))
    for precision, named in (("bf16", True), ("fp32", False)):
        assert main(["train", "--config", str(config), "--data", str(digits["train"]), "--logdir",
                     str(tmp_path / precision), "--device", "cpu", "--precision", precision]) == 0
        out = capsys.readouterr().out
        assert ("no native bf16" in out) == named
        assert f"process(es) on cpu in {precision};" in out


def test_unknown_precision_is_rejected(tiny_config, digits, config_file, tmp_path, capsys) -> None:
    with pytest.raises(ValueError, match="'precision' must be one of"):
        load_config(dict(tiny_config, precision="fp16"))
    code = main(["train", "--config", str(config_file(tiny_config)), "--data", str(digits["train"]),
                 "--logdir", str(tmp_path / "run"), "--precision", "half"])
    assert code == 2
    assert "precision" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_attention_of_bf16_inputs_on_a_cpu_runs_in_float32() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 16, generator=g).bfloat16() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16), DtypeLog() as log:
        out = attend(q, k, v, None, is_causal=True)
    assert out.dtype == torch.bfloat16
    assert set(log.seen) == {("_scaled_dot_product_flash_attention_for_cpu", ("torch.float32",))}
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).bfloat16()
    assert torch.equal(out, want)
    # a layer under autocast: bf16 projections, float32 attention forward and backward (RoPE in between)
    from starflow.models.layers import Attention
    from starflow.models.rope import rope_angles, rope_rotation

    layer, x = Attention(32, 16), torch.randn(2, 9, 32, generator=g, requires_grad=True)
    rope = rope_rotation(rope_angles(16, (1, 3, 3), 1.0))
    with DtypeLog() as log:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x, rope)
        y.float().sum().backward()
    assert y.dtype == torch.bfloat16
    # (training on a CPU: the attention is causal_self_attention_in_chunks, batched matmuls)
    assert log.seen.keys() == {("addmm", ("torch.bfloat16",)), ("mm", ("torch.bfloat16",)),
                               ("baddbmm", ("torch.float32",)), ("bmm", ("torch.float32",))}


@pytest.mark.usefixtures("one_thread")
def test_bf16_training_on_a_cpu(tiny_config, digits, config_file, tmp_path: Path, monkeypatch) -> None:
    """``--precision bf16``: the linear layers' matmuls (forward and backward) run in bf16, attention in float32;
    the losses follow the float32 run closely without being equal to it (the key is honoured); the saved
    weights stay float32. ``auto`` on a CPU is the float32 run."""
    from starflow.adapters.text import TextEncoder

    encode = TextEncoder._encode  # the T5 call of forward and encode_templated

    def encode_unlogged(self, prompts):
        DtypeLog.paused = True
        try:
            return encode(self, prompts)
        finally:
            DtypeLog.paused = False

    monkeypatch.setattr(TextEncoder, "_encode", encode_unlogged)
    config = config_file(dict(tiny_config, steps=5))
    losses, logs = {}, {}
    for precision in ("auto", "fp32", "bf16"):
        logdir = tmp_path / precision
        with torch.random.fork_rng(devices=[]), DtypeLog() as log:
            assert main(["train", "--config", str(config), "--data", str(digits["train"]), "--logdir", str(logdir),
                         "--device", "cpu", "--precision", precision]) == 0
        records = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
        losses[precision], logs[precision] = [r["loss"] for r in records if "loss" in r], log.seen
    assert losses["auto"] == losses["fp32"]
    assert len(losses["bf16"]) == 5
    np.testing.assert_allclose(losses["bf16"], losses["fp32"], rtol=2e-2)
    assert losses["bf16"] != losses["fp32"]

    def matmuls(seen: Counter) -> Counter:
        out: Counter = Counter()
        for (op, dtypes), n in seen.items():
            if op in ("mm", "addmm"):
                out[dtypes] += n
        return out

    # every matmul of the flow (forward and backward) in bf16, as many as the float32 run has in float32
    fp32, bf16 = matmuls(logs["fp32"]), matmuls(logs["bf16"])
    assert fp32.keys() == {("torch.float32",)} and bf16.keys() == {("torch.bfloat16",)}, (fp32, bf16)
    assert bf16[("torch.bfloat16",)] == fp32[("torch.float32",)] > 0
    attention = {dtypes for (op, dtypes) in logs["bf16"] if op in ("bmm", "baddbmm") or op.startswith("_scaled_dot")}
    assert attention == {("torch.float32",)}, logs["bf16"]
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "bf16" / "model" / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float32}


@pytest.mark.parametrize("jacobi", [False, True])
def test_bf16_weights_sample_on_a_cpu_with_the_learnable_denoiser(make_pipeline, jacobi: bool) -> None:
    """``starflow sample --bf16`` on a CPU: KV-cached decoding in bf16 and a video model's learnable denoiser
    (float32 latents into bf16 weights) give the float32 sample to bf16 accuracy."""
    from starflow.sampling.pipeline import SampleSettings
    from helpers import TINY_VIDEO

    pipe = make_pipeline(**TINY_VIDEO)
    settings = SampleSettings(cfg=2.0, jacobi=jacobi, jacobi_block_size=4)
    prompts = ["a handwritten digit 3", "a handwritten digit 8"]
    want = pipe(prompts, settings, seeds=[0, 1])
    pipe.model.to(torch.bfloat16)
    got = pipe(prompts, settings, seeds=[0, 1])
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert 0 < ((got - want).norm() / want.norm()).item() < 2e-2


def test_sharded_bf16_passes_float32_activations_between_flow_blocks(tiny_config, tmp_path: Path, monkeypatch) -> None:
    """FSDP2 in bf16 (``parallelize`` for ``fsdp: 1``, on one rank of a gloo group here): every flow block
    receives its input in float32, as under single-process autocast, and the loss is autocast's up to bf16
    rounding of the weights. (FSDP2's default policy casts each sharded module's inputs to bf16, which would
    round the flow's path from block to block.)"""
    import torch.distributed as dist

    from starflow.distributed import DistInfo, is_sharded
    from starflow.models.tarflow_block import FlowBlock
    from starflow.train.parallelize import parallelize

    cfg = load_config(dict(tiny_config))
    torch.manual_seed(0)
    model = STARFlow(cfg, txt_dim=8)
    x, y = torch.randn(4, 1, 8, 8), torch.randn(4, cfg.txt_size, 8)
    seen: list[torch.dtype] = []
    forward = FlowBlock.forward

    def spy(self, x, *args, **kwargs):
        seen.append(x.dtype)
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(FlowBlock, "forward", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = model.loss(x, y)["loss"].item()
    assert seen == [torch.float32] * cfg.num_blocks
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        seen.clear()
        # parallelize's FSDP2 branch, as a trainer of several ranks takes it (this group has one rank)
        bf16_fsdp = load_config(dict(tiny_config, fsdp=1, precision="bf16"))
        parallelize(model, bf16_fsdp, DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu")))
        assert is_sharded(model)
        got = model.loss(x, y)["loss"].item()
    finally:
        dist.destroy_process_group()
    assert seen == [torch.float32] * cfg.num_blocks
    assert abs(got - want) < 0.02 * abs(want)
