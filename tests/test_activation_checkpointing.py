"""Activation checkpointing (config ``gradient_checkpoint`` / ``gradient_checkpoint_mlp``) changes memory, not maths.

Checkpointed sub-layers must give the same loss and gradients, be chosen by the every-k-th-layer rule in
each flow block and in the learnable denoiser, really run twice per training step, and leave the
KV-cached sampling path alone.
"""
from __future__ import annotations

import pytest
import torch

import starflow.models.layers as layers_module
from starflow.config import load_config
from starflow.models import STARFlow
from starflow.models.layers import MLP, Attention, AttentionBlock, set_activation_checkpointing

TXT_DIM, TXT_LEN = 8, 3
TINY = dict(channel_size=2, img_size=4, patch_size=1, channels=32, head_dim=16, layers_per_block=[1, 3],
            rope=1, sos=1, txt_size=TXT_LEN, use_softplus=1, use_final_norm=1, soft_clip=4.0,
            learnable_self_denoiser=1)


def tiny(attention_every: int, mlp_every: int) -> STARFlow:
    """A tiny text-conditioned flow (blocks of 1 and 3 layers, 8-layer denoiser) with perturbed output layers."""
    torch.manual_seed(0)
    cfg = dict(TINY, gradient_checkpoint=attention_every, gradient_checkpoint_mlp=mlp_every)
    model = STARFlow.from_config(cfg, txt_dim=TXT_DIM)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proj_out.weight" in name or "final_norm.weight" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.train()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(2, 2, 4, 4, generator=g), torch.randn(2, TXT_LEN, TXT_DIM, generator=g)


def train_step(model: STARFlow) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Flow loss plus a denoiser term, backward; returns the loss and every parameter's gradient."""
    x, y = batch()
    loss = model.loss(x, y)["loss"] + model.denoiser(x, y).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def stacks(model: STARFlow) -> list[torch.nn.ModuleList]:
    return [b.attn_blocks for b in model.blocks] + [model.learnable_self_denoiser.attn_blocks]


@pytest.mark.parametrize("attention_every, mlp_every", [(1, 0), (0, 1), (1, 1), (2, 2), (2, 1), (3, 0)])
def test_same_loss_and_gradients(attention_every: int, mlp_every: int) -> None:
    ref_loss, ref_grads = train_step(tiny(0, 0))
    loss, grads = train_step(tiny(attention_every, mlp_every))
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("every, expected", [(0, [[], [], []]), (1, [[0], [0, 1, 2], list(range(8))]),
                                             (2, [[0], [0, 2], [0, 2, 4, 6]]), (3, [[0], [0], [0, 3, 6]])])
def test_flags_follow_the_every_kth_layer_rule(every: int, expected: list[list[int]]) -> None:
    attn = tiny(every, 0)
    mlp = tiny(0, every)
    for stack_a, stack_m, want in zip(stacks(attn), stacks(mlp), expected, strict=True):
        assert [j for j, layer in enumerate(stack_a) if layer.checkpoint_attention] == want
        assert [j for j, layer in enumerate(stack_m) if layer.checkpoint_mlp] == want
        assert not any(layer.checkpoint_mlp for layer in stack_a)
        assert not any(layer.checkpoint_attention for layer in stack_m)


def test_flags_are_not_state() -> None:
    assert tiny(1, 1).state_dict().keys() == tiny(0, 0).state_dict().keys()


@pytest.mark.parametrize("attention_every, mlp_every", [(0, 0), (1, 0), (0, 2), (2, 1)])
def test_checkpointed_sublayers_run_again_in_backward(attention_every: int, mlp_every: int) -> None:
    model = tiny(attention_every, mlp_every)
    calls = {Attention: 0, MLP: 0}

    def count(module: torch.nn.Module, args) -> None:
        calls[type(module)] += 1

    for module in model.modules():  # a pre-hook: the recomputation stops once it has what backward needs
        if isinstance(module, (Attention, MLP)):
            module.register_forward_pre_hook(count)
    x, y = batch()
    loss = model.loss(x, y)["loss"] + model.denoiser(x, y).square().mean()
    layers = [layer for stack in stacks(model) for layer in stack]
    assert calls == {Attention: len(layers), MLP: len(layers)}  # 1 + 3 flow layers, 8 denoiser layers
    loss.backward()
    assert calls[Attention] == len(layers) + sum(layer.checkpoint_attention for layer in layers)
    assert calls[MLP] == len(layers) + sum(layer.checkpoint_mlp for layer in layers)


def test_no_checkpointing_in_eval_without_grad_or_with_a_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[0])
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)

    monkeypatch.setattr(layers_module, "checkpoint", spy)
    model = tiny(1, 1)
    x, y = batch()
    model.loss(x, y)
    assert len(calls) == 2 * 4  # training with grad: attention and MLP of the 4 flow layers
    calls.clear()
    with torch.no_grad():
        model.loss(x, y)
    model.eval().loss(x, y)["loss"].backward()
    assert calls == []


@pytest.mark.parametrize("jacobi", [False, True])
def test_sampling_unchanged(jacobi: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(layers_module, "checkpoint", lambda *a, **k: calls.append(a) or a[0](*a[1:]))
    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    y = batch()[1]
    ref = tiny(0, 0).reverse(noise, torch.cat([y, torch.zeros_like(y)]), guidance=1.5, jacobi=jacobi)
    out = tiny(1, 1).reverse(noise, torch.cat([y, torch.zeros_like(y)]), guidance=1.5, jacobi=jacobi)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert calls == []


def test_block_level_function() -> None:
    stack = torch.nn.ModuleList(AttentionBlock(16, 8) for _ in range(5))
    set_activation_checkpointing(stack, attention_every=2, mlp_every=4)
    assert [layer.checkpoint_attention for layer in stack] == [True, False, True, False, True]
    assert [layer.checkpoint_mlp for layer in stack] == [True, False, False, False, True]
    set_activation_checkpointing(stack, 0, 0)
    assert not any(layer.checkpoint_attention or layer.checkpoint_mlp for layer in stack)
    with pytest.raises(ValueError, match="periods"):
        set_activation_checkpointing(stack, -1, 0)


@pytest.mark.parametrize("value, expected", [(0, 0), (1, 1), (2, 2), (True, 1), (False, 0), ("1", 1),
                                             ("true", 1), ("False", 0), ("4", 4)])
def test_config_accepts_official_and_bool_values(value, expected: int) -> None:
    cfg = load_config({"gradient_checkpoint": value, "gradient_checkpoint_mlp": value})
    assert cfg.gradient_checkpoint == expected and cfg.gradient_checkpoint_mlp == expected
    assert type(cfg.gradient_checkpoint) is int


def test_the_mlp_follows_gradient_checkpoint_unless_set() -> None:
    for mlp, expected in ((None, [True, True, True]), (0, [False, False, False]), (2, [True, False, True])):
        keys = {} if mlp is None else {"gradient_checkpoint_mlp": mlp}
        model = STARFlow.from_config(dict(TINY, gradient_checkpoint=1, **keys), txt_dim=TXT_DIM)
        layers = model.blocks[-1].attn_blocks
        assert [layer.checkpoint_attention for layer in layers] == [True] * 3
        assert [layer.checkpoint_mlp for layer in layers] == expected, mlp


@pytest.mark.parametrize("value", [-1, 1.5, "yes please"])
def test_config_rejects_bad_periods(value) -> None:
    with pytest.raises(ValueError, match="gradient_checkpoint_mlp"):
        load_config({"gradient_checkpoint_mlp": value})
