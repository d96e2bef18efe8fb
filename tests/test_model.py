"""Properties of the flow on tiny random models: exact inversion, log-determinants, caches, guidance, layout.

Models are built randomly and then ``proj_out`` / ``final_norm`` are perturbed: their zero initialisation
makes a fresh flow the identity, which would hide every bug these tests look for.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from starflow.adapters.geometry import vae_geometry
from starflow.checkpoint import compare_layout
from starflow.config import load_config
from starflow.models import STARFlow, layers, patchify, unpatchify
from starflow.models.rope import apply_rope, rope_angles, rope_rotation
from starflow.models.tarflow_block import FlowBlock, IdentityBlock
from starflow.models.jacobi import DecodeStats, JacobiSettings, decode_block
from starflow.models.layers import MLP, gelu_without_onednn

REPO = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(os.environ.get("STARFLOW_REFERENCE_DIR", REPO.parent / "shared" / "reference"))
TXT_DIM, TXT_LEN = 8, 3
TINY = dict(channel_size=2, img_size=4, patch_size=1, channels=32, head_dim=16, layers_per_block=[1, 1, 2],
            rope=1, sos=1, txt_size=TXT_LEN, cond_top_only=1, use_softplus=1, use_final_norm=1, soft_clip=4.0,
            seq_order="L2R")
VIDEO = dict(temporal_causal=2, shallow_block_local=1)
VARIANTS = {
    "default": {},
    "r2l": dict(seq_order="R2L"),
    "no_sos": dict(sos=0),
    "exp_scale": dict(use_softplus=0),
    "no_final_norm_no_clip": dict(use_final_norm=0, soft_clip=0.0),
    "identity_shallow": dict(layers_per_block=[0, 1, 2]),
    "no_rope": dict(rope=0),
    "text_everywhere": dict(cond_top_only=0),
    "unconditional": dict(txt_size=0, cond_top_only=0),
    "four_blocks": dict(layers_per_block=[1, 1, 1, 1]),
    "video": VIDEO,
    "video_global_shallow": dict(temporal_causal=2),
    "video_no_sos_r2l": dict(VIDEO, sos=0, seq_order="R2L"),
    "video_text_everywhere": dict(VIDEO, cond_top_only=0),
}


def perturb(model: torch.nn.Module, std: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Add noise to the zero-initialised output layers so the flow is not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proj_out.weight" in name or "final_norm.weight" in name:
                p.add_(std * torch.randn(p.shape, generator=g))
    return model


def tiny(seed: int = 0, **overrides) -> STARFlow:
    torch.manual_seed(seed)
    cfg = dict(TINY, **overrides)
    return perturb(STARFlow.from_config(cfg, txt_dim=TXT_DIM if cfg["txt_size"] else None), seed=seed).eval()


def inputs(model: STARFlow, batch: int = 2, frames: int | None = None, seed: int = 1):
    """Data ``x (B, [T,] C, H, W)``, text ``y (B, L, txt_dim)`` and unconditional text (or None, None)."""
    g = torch.Generator().manual_seed(seed)
    c, s = model.config.channel_size, model.config.img_size
    x = torch.randn((batch, frames, c, s, s) if frames else (batch, c, s, s), generator=g)
    if not model.config.txt_size:
        return x, None, None
    y = torch.randn(batch, TXT_LEN, TXT_DIM, generator=g)
    return x, y, torch.randn(batch, TXT_LEN, TXT_DIM, generator=g)


def case(name: str) -> tuple[STARFlow, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    overrides = VARIANTS[name]
    model = tiny(**overrides)
    return (model, *inputs(model, frames=3 if "temporal_causal" in overrides else None))


# ------------------------------------------------------------------ inversion
@pytest.mark.parametrize("name", VARIANTS)
def test_each_block_inverts_exactly(name: str) -> None:
    model, x, y, _ = case(name)
    with torch.no_grad():
        out = model(x, y)
    assert (out.z - x).abs().max() > 0.1, "the perturbed flow should not be the identity"
    txt_len = 0 if y is None else y.shape[1]
    for i in range(model.num_blocks):
        before = model.reverse_block(i, out.outputs[i + 1], y, 0.0, JacobiSettings(), txt_len)
        torch.testing.assert_close(before, out.outputs[i], atol=2e-5, rtol=0)
    torch.testing.assert_close(model.reverse(out.z, y), x, atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", ["default", "text_everywhere", "video"])
def test_forward_of_sample_gives_back_the_noise(name: str) -> None:
    model, noise, y, y_uncond = case(name)
    sample = model.reverse(noise, torch.cat([y, y_uncond]), guidance=0.0)
    with torch.no_grad():
        torch.testing.assert_close(model(sample, y).z, noise, atol=2e-5, rtol=0)


def test_identity_shallow_block_has_no_parameters() -> None:
    model = tiny(layers_per_block=[0, 1, 2])
    assert isinstance(model.blocks[0], IdentityBlock)
    assert not any(k.startswith("blocks.0.") for k in model.state_dict())
    x, y, _ = inputs(model)
    with torch.no_grad():
        out = model(x, y)
    assert torch.equal(out.outputs[1], out.outputs[0]) and not out.logdets[0].any()


@pytest.mark.parametrize("order, flips", [("L2R", [True, False, True, False, True, False]),
                                          ("R2L", [False, True, False, True, False, True])])
def test_token_orders_alternate(order: str, flips: list[bool]) -> None:
    model = tiny(seq_order=order, layers_per_block=[1] * 6, txt_size=0, cond_top_only=0)
    assert [model.block_flips(i) for i in range(6)] == flips  # SPEC section 5, K = 6


def test_text_in_every_block_when_not_cond_top_only() -> None:
    model = tiny(cond_top_only=0)
    assert all(block.proj_txt is not None for block in model.blocks)
    assert all(block.proj_txt is None for block in tiny().blocks[:-1])


def test_bfloat16_model_runs_forward() -> None:
    model = tiny().to(torch.bfloat16)
    x, y, _ = inputs(model)
    with torch.no_grad():
        z = model(x.bfloat16(), y.bfloat16()).z
    assert z.dtype == torch.float32 and z.isfinite().all()


def test_compiled_layers_sample_like_eager_and_keep_names() -> None:
    """Compiled sampling steps (dynamic shapes over the fixed-size KV cache) give the eager samples, and
    parameter names do not change."""
    model = tiny()
    x, y, _ = inputs(model)
    noise = torch.randn_like(x)
    eager = model.reverse(noise, y, jacobi=True, jacobi_block_size=4)
    names = list(model.state_dict())
    model.compile_layers()
    torch.testing.assert_close(model.reverse(noise, y, jacobi=True, jacobi_block_size=4), eager, atol=1e-4, rtol=1e-4)
    assert list(model.state_dict()) == names


# ------------------------------------------------------------------ log-determinant
def brute_force_logdet(f, x: torch.Tensor) -> torch.Tensor:
    jac = torch.autograd.functional.jacobian(lambda v: f(v.view_as(x)).flatten(), x.flatten())
    return torch.linalg.slogdet(jac.double()).logabsdet, jac


def test_rope_text_positions_need_the_third_axis() -> None:
    angles = rope_angles(16, (1, 2, 2), 2.0, txt_len=3, three_axis=True)
    assert angles.shape == (3 + 4, 16)
    with pytest.raises(ValueError, match="three_axis"):
        rope_angles(16, (1, 2, 2), 2.0, txt_len=3)


def test_block_logdet_matches_jacobian() -> None:
    torch.manual_seed(0)
    block = FlowBlock(2, 16, 1, 8, None, sos=True, use_softplus=True, use_final_norm=True, soft_clip=4.0)
    perturb(block, std=0.3)
    rope = rope_rotation(rope_angles(8, (1, 1, 3), 3.0))
    x = torch.randn(1, 3, 2)  # D = 2, N = 3
    logabsdet, jac = brute_force_logdet(lambda v: block(v, None, rope)[0], x)
    _, logdet, _ = block(x, None, rope)
    assert abs(logdet.sum().item()) > 0.05
    torch.testing.assert_close(logdet.sum().double(), logabsdet, atol=1e-4, rtol=0)
    jac = jac.view(3, 2, 3, 2)
    for t in range(3):  # autoregressive: z_t depends on x_t (diagonally) and on earlier tokens only
        assert not jac[t, :, t + 1:].any()
        assert not (jac[t, :, t] - torch.diag(torch.diagonal(jac[t, :, t]))).any()


@pytest.mark.parametrize("name", ["default", "exp_scale", "no_sos"])
def test_model_logdet_matches_jacobian(name: str) -> None:
    model = tiny(**dict(VARIANTS[name], img_size=2))  # N = 4 tokens of D = 2: an 8 x 8 Jacobian
    x, y, _ = inputs(model, batch=1)
    logabsdet, _ = brute_force_logdet(lambda v: model(v, y).z, x)
    total = sum(ld.sum() for ld in model(x, y).logdets)
    torch.testing.assert_close(total.double(), logabsdet, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ KV cache and Jacobi
@pytest.mark.parametrize("sos", [1, 0])
@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_cached_chunk_params_equal_uncached_forward(sos: int, chunk: int) -> None:
    model = tiny(sos=sos)
    x, y, _ = inputs(model)
    i = model.num_blocks - 1
    block = model.blocks[i]  # the deep, text-conditioned block
    seq = torch.randn(2, 16, block.in_dim)
    rope = model.block_rope(i, (2, 4, 4, block.in_dim), TXT_LEN)
    with torch.no_grad():
        _, _, o = block(seq, y, rope)
        a_ref, b_ref, _ = block.scale_shift(o)
        cache = block.new_cache(2, TXT_LEN + 16, torch.float32, seq.device)
        block.prefill_text(y, rope, cache)
        params = []
        for s in range(0, 16, chunk):
            e = min(s + chunk, 16)
            first = seq[:, s - 1:s] if s else torch.zeros_like(seq[:, :1])
            params.append(block.chunk_params(torch.cat([first, seq[:, s:e - 1]], 1), s, TXT_LEN, rope, cache))
    torch.testing.assert_close(torch.cat([a for a, _ in params], 1), a_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([b for _, b in params], 1), b_ref, atol=1e-5, rtol=1e-5)


def test_one_token_decoding_steps_take_atens_gelu_and_leave_onednn_on() -> None:
    """KV-cached one-token steps on a CPU run ATen's GELU kernel (oneDNN's costs ~25 us a call at that size); chunks
    and whole sequences keep PyTorch's default; the oneDNN switch is restored, also after an error."""
    torch.manual_seed(0)
    mlp = MLP(32).eval()
    step, chunk = torch.randn(8, 1, 32), torch.randn(8, 4, 32)
    with torch.no_grad():
        with torch.backends.mkldnn.flags(enabled=False):
            aten = mlp(step)
        assert not torch.equal(aten, mlp(step))  # the kernels round differently here, so the next check can fail
        assert torch.equal(mlp(step, direct=True), aten)
        assert torch.equal(mlp(chunk, direct=True), mlp(chunk))
    assert torch.backends.mkldnn.enabled
    with pytest.raises(RuntimeError):
        gelu_without_onednn(torch.ones(3, dtype=torch.int64))
    assert torch.backends.mkldnn.enabled


def _split_attention(qkv: torch.Tensor, rotation: torch.Tensor | None, heads: int) -> torch.Tensor:
    """Causal attention of a fused projection the plain way: split, RoPE, SDPA, heads side by side."""
    b, n, _ = qkv.shape
    q, k, v = qkv.view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    if rotation is not None:
        q, k = apply_rope(q, rotation), apply_rope(k, rotation)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, -1)


@pytest.mark.parametrize("n", [40, 280, 561])
@pytest.mark.parametrize("rope", [True, False])
def test_chunked_causal_attention_is_causal_attention(n: int, rope: bool) -> None:
    """The CPU training attention (query chunks over the keys they may see, its backward pass written out) gives the
    split, rotated SDPA attention and its gradient: to float64 rounding in float64 (RoPE's float32 rotation table
    apart), to float32 rounding in float32."""
    g = torch.Generator().manual_seed(n)
    assert len(layers._chunk_edges(n)) - 1 == max(1, round(n / layers.CAUSAL_CHUNK))
    rotation = rope_rotation(rope_angles(16, (1, n, 1), 4.0)) if rope else None
    for dtype, tol in ((torch.float64, 1e-6 if rope else 1e-12), (torch.float32, 1e-5)):
        qkv = torch.randn(2, n, 3 * 3 * 16, generator=g, dtype=dtype, requires_grad=True)
        grad = torch.randn(2, n, 3 * 16, generator=g, dtype=dtype)
        got = layers.causal_self_attention_in_chunks(qkv, rotation, 3)
        want = _split_attention(qkv, rotation, 3)
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
        (grad_got,) = torch.autograd.grad(got, qkv, grad)
        (grad_want,) = torch.autograd.grad(want, qkv, grad)
        torch.testing.assert_close(grad_got, grad_want, atol=tol, rtol=tol)


def test_cached_chunk_attention_on_a_cpu_is_sdpa_with_the_boolean_mask() -> None:
    """A Jacobi chunk over a KV cache on a CPU: an additive mask (a view of one cached table) attended with batched
    matmuls, equal to SDPA with the boolean mask it stands for; bf16 and long caches keep the boolean mask."""
    g = torch.Generator().manual_seed(0)
    start, n, max_len = 30, 16, 88
    bias = layers.cached_chunk_mask(start, n, max_len, torch.float32, torch.device("cpu"))
    allowed = torch.arange(start + n)[None, :] <= start + torch.arange(n)[:, None]
    assert bias.shape == (n, start + n) and bias.dtype == torch.float32
    assert torch.equal(bias == 0, allowed) and torch.isneginf(bias[~allowed]).all()
    assert layers.cached_chunk_mask(start, n, max_len, torch.float32, torch.device("cpu")).data_ptr() == bias.data_ptr()
    for dtype, length in ((torch.bfloat16, max_len), (torch.float32, layers.CHUNKED_MAX_LEN + 1)):
        assert torch.equal(layers.cached_chunk_mask(start, n, length, dtype, torch.device("cpu")), allowed)
    q = torch.randn(4, 3, n, 32, generator=g)
    k, v = (torch.randn(4, 3, max_len, 32, generator=g)[:, :, : start + n] for _ in range(2))  # cache views
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    torch.testing.assert_close(layers.attend_cached(q, k, v, bias), want, atol=1e-6, rtol=1e-6)
    assert torch.equal(layers.attend_cached(q, k, v, allowed), want)


def test_attention_takes_the_chunks_only_for_training_within_their_memory(monkeypatch) -> None:
    """A layer's attention on a CPU: the chunks when a backward pass follows and their probabilities fit, the flash
    kernel otherwise (inference, or over ``CHUNKED_PROBABILITIES_MAX_BYTES``); explicit masks always go to SDPA."""
    calls = []
    chunks = layers.causal_self_attention_in_chunks
    monkeypatch.setattr(layers, "causal_self_attention_in_chunks", lambda *a: calls.append("chunks") or chunks(*a))
    layer, x = layers.Attention(48, 16), torch.randn(2, 300, 48)
    rope = rope_rotation(rope_angles(16, (1, 20, 15), 4.0))
    chunked = layer(x, rope)
    with torch.no_grad():
        flash = layer(x, rope)
    masked = layer(x, rope, torch.ones(300, 300, dtype=torch.bool).tril())
    assert calls == ["chunks"]
    torch.testing.assert_close(chunked, flash, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked, flash, atol=1e-5, rtol=1e-5)
    # 2 x 3 rows x (150 x 150 + 150 x 300) probabilities of 4 bytes = 1,620,000 bytes
    assert layers.causal_chunk_edges(6, 300, 4) == [0, 150, 300]
    assert layers.causal_chunk_edges(1, layers.CHUNKED_MAX_LEN, 4) is not None
    assert layers.causal_chunk_edges(1, layers.CHUNKED_MAX_LEN + 1, 4) is None  # (its bias would pass 16 MiB)
    monkeypatch.setattr(layers, "CHUNKED_PROBABILITIES_MAX_BYTES", 1_620_000 - 1)
    assert layers.causal_chunk_edges(6, 300, 4) is None
    layer(x, rope)
    assert calls == ["chunks"]


@pytest.mark.parametrize("w", [0.0, 2.0])
@pytest.mark.parametrize("name", ["default", "no_sos", "text_everywhere", "video", "video_text_everywhere"])
def test_exact_jacobi_equals_sequential(name: str, w: float) -> None:
    model, noise, y, y_uncond = case(name)
    rows = torch.cat([y, y_uncond])
    sequential = model.reverse(noise, rows, guidance=w)
    # k iterations reach the fixed point of a k-token chunk; video chunks after the first frame may be
    # 4k long with a shifted first guess (SPEC section 9), hence 4k + 1 there
    max_iter = 4 * 4 + 1 if noise.dim() == 5 else 4
    jacobi = model.reverse(noise, rows, guidance=w, jacobi=True, jacobi_block_size=4, jacobi_th=0.0,
                           jacobi_max_iter=max_iter)
    torch.testing.assert_close(jacobi, sequential, atol=2e-5, rtol=0)


def test_guidance_combines_the_halves_as_the_paper_and_anneals_linearly() -> None:
    """SPEC section 8: ``s = min(a_c / a_u, 1)^2``, ``a = a_c / sqrt(1 + w - w s)``,
    ``b = ((1 + w) b_c - w s b_u) / (1 + w - w s)``; annealed, token t of N gets ``w (t + 1) / N``."""
    from starflow.models.guidance import guide, guidance_weights

    a = torch.tensor([[[0.5]], [[2.0]], [[1.0]], [[1.0]]])  # rows [cond 0, cond 1; uncond 0, uncond 1]
    b = torch.tensor([[[1.0]], [[1.0]], [[3.0]], [[3.0]]])
    a_g, b_g = guide(a, b, 2.0)
    # row 0: s = 0.25, 1 + w - w s = 2.5; row 1: a_c / a_u = 2 is clamped to 1, s = 1, 1 + w - w s = 1
    expected_a = torch.tensor([0.5 / 2.5 ** 0.5, 2.0]).reshape(2, 1, 1)
    expected_b = torch.tensor([(3 * 1.0 - 2 * 0.25 * 3.0) / 2.5, 3 * 1.0 - 2 * 3.0]).reshape(2, 1, 1)
    torch.testing.assert_close(a_g, torch.cat([expected_a, expected_a]), rtol=1e-6, atol=0)
    torch.testing.assert_close(b_g, torch.cat([expected_b, expected_b]), rtol=1e-6, atol=0)
    assert guidance_weights(2.0, 0, 4, 4, False, torch.device("cpu")) == 2.0
    assert guidance_weights(2.0, 0, 4, 4, True, torch.device("cpu")).flatten().tolist() == [0.5, 1.0, 1.5, 2.0]
    assert guidance_weights(2.0, 2, 4, 4, True, torch.device("cpu")).flatten().tolist() == [1.5, 2.0]


@pytest.mark.parametrize("name", ["default", "video"])
def test_per_sample_stopping_does_not_depend_on_the_batch(name: str) -> None:
    """``jacobi_stop sample`` with a real threshold over several chunks: each sample stops on its own, so a sample
    decoded in a batch equals the same sample decoded alone (a frozen row must keep its inputs)."""
    model, noise, y, y_uncond = case(name)
    kw = dict(guidance=2.0, jacobi=True, jacobi_block_size=4, jacobi_th=1e-3, jacobi_stop="sample")
    both = model.reverse(noise, torch.cat([y, y_uncond]), **kw)
    alone = torch.cat([model.reverse(noise[i : i + 1], torch.cat([y[i : i + 1], y_uncond[i : i + 1]]), **kw)
                       for i in range(noise.shape[0])])
    torch.testing.assert_close(both, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("stop", ["batch", "sample"])
@pytest.mark.parametrize("layout", [VIDEO, dict(temporal_causal=2)], ids=["frame_local", "video_global"])
def test_a_one_token_video_chunk_reads_the_decoded_inputs(layout: dict, stop: str) -> None:
    """3 frames of 3x3 tokens with block size 2: the last chunk after the first frame is one token long, so it is
    evaluated once; that evaluation must read the decoded previous token, not the one-frame-back first guess."""
    model = tiny(**layout)
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(2, 3, 2, 3, 3, generator=gen)  # (B, T, C, H, W): F = 9 tokens per frame, N = 27
    y = torch.randn(2, TXT_LEN, TXT_DIM, generator=gen)
    sequential = model.reverse(noise, y)
    # (threshold 0 is never met, so every chunk runs jacobi_max_iter iterations: 32 reach the sequential result)
    jacobi = model.reverse(noise, y, jacobi=True, jacobi_block_size=2, jacobi_th=0.0, jacobi_max_iter=32,
                           jacobi_stop=stop)
    torch.testing.assert_close(jacobi, sequential, atol=1e-4, rtol=0)


@pytest.mark.parametrize("start", [16, 17])
def test_a_known_video_run_after_the_first_frame_is_cached_from_its_real_inputs(start: int) -> None:
    """Teacher forcing (inpainting) on 3 frames of 16 tokens: a known run [start, 32) is evaluated once, only to fill
    the KV cache; starting after the first frame it must still be fed its decoded inputs, or every generated token
    after it attends to wrong keys and values."""
    model = tiny(temporal_causal=2)
    block = model.blocks[-1]
    frame, frames = 16, 3
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(2, TXT_LEN, TXT_DIM, generator=gen)
    z = torch.randn(2, frames * frame, block.in_dim, generator=gen)
    known = torch.randn(2, frames * frame, block.in_dim, generator=gen)
    known_mask = torch.zeros(2, frames * frame, 1, dtype=torch.bool)
    known_mask[:, start:32] = True
    rope = model.block_rope(model.num_blocks - 1, (2, frames, 4, 4, block.in_dim), TXT_LEN)
    kw = dict(guidance=0.0, frame_tokens=frame, known=known, known_mask=known_mask)
    with torch.inference_mode():
        sequential = decode_block(block, z, y, rope, jacobi=JacobiSettings(), **kw)
        for size in (4, 8):
            jacobi = decode_block(block, z, y, rope, jacobi=JacobiSettings(True, size, 0.0, 1000), **kw)
            torch.testing.assert_close(jacobi, sequential, atol=1e-4, rtol=0)


def test_batch_rule_skips_the_final_prefix_and_keeps_the_fixed_point() -> None:
    model = tiny()
    block = model.blocks[0]
    z = torch.randn(2, 16, block.in_dim)
    seq = decode_block(block, z, None, None, guidance=0.0, jacobi=JacobiSettings())
    stats = DecodeStats()
    jac = decode_block(block, z, None, None, guidance=0.0, jacobi=JacobiSettings(True, 16, 0.0, 16), stats=stats)
    torch.testing.assert_close(jac, seq, atol=1e-5, rtol=0)
    # later iterations skip the tokens already final; the last token is final one iteration early when the
    # iteration before left every other token unchanged (which float rounding decides)
    assert 15 <= stats.evaluations <= 16 and stats.tokens < 16 * 16
    per_sample = DecodeStats()
    decode_block(block, z, None, None, guidance=0.0, jacobi=JacobiSettings(True, 16, 0.0, 16, "sample"),
                 stats=per_sample)
    assert per_sample.tokens == per_sample.evaluations * 16  # the per-sample rule evaluates whole chunks


def test_jacobi_iterations_sync_with_the_host_once(monkeypatch) -> None:
    """Each Jacobi iteration reads one value set from the device: the batch rule's change and final prefix in one
    transfer, the per-sample rule's "any row still active" flag; the last allowed iteration reads nothing."""
    model = tiny()
    block = model.blocks[0]
    z = torch.randn(2, 16, block.in_dim)
    syncs = []
    for method in ("item", "tolist", "__int__", "__float__", "__bool__"):
        original = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method,
                            lambda self, _f=original: (syncs.append(1), _f(self))[1])
    for stop in ("batch", "sample"):
        syncs.clear()
        stats = DecodeStats()
        decode_block(block, z, None, None, guidance=0.0, jacobi=JacobiSettings(True, 16, 0.0, 16, stop), stats=stats)
        assert stats.evaluations > 1
        assert len(syncs) <= stats.evaluations - (stop == "batch" and stats.evaluations == 16)  # (16: the cap)


def test_auto_block_size_follows_the_rows_and_device() -> None:
    from starflow.models.jacobi import AUTO, auto_block_size

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert [auto_block_size(r, cpu) for r in (1, 2, 4, 8, 16, 32)] == [64, 64, 64, 32, 1, 1]
    assert auto_block_size(32, gpu) == 64
    model = tiny()
    block = model.blocks[0]
    for rows, equal_to in ((16, JacobiSettings()), (2, JacobiSettings(True, 64, 1e-4))):
        z = torch.randn(rows, 16, block.in_dim)
        auto = decode_block(block, z, None, None, guidance=0.0, jacobi=JacobiSettings(True, AUTO, 1e-4))
        assert torch.equal(auto, decode_block(block, z, None, None, guidance=0.0, jacobi=equal_to))
    with pytest.raises(ValueError, match="'auto'"):
        JacobiSettings(True, "big")


def test_auto_block_size_is_chosen_for_the_jobs_batch() -> None:
    """With jacobi_auto_batch a job's smaller last batch decodes with the chunks of its full batch (its samples then
    differ from the full batch's only by float rounding); without it the block size follows the smaller batch."""
    model = tiny()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(8, 2, 4, 4, generator=g)
    y = torch.randn(16, TXT_LEN, TXT_DIM, generator=g)  # [cond; uncond]
    y_last = torch.cat([y[6:8], y[14:16]])
    kw = dict(guidance=1.5, jacobi=True, jacobi_block_size="auto", jacobi_th=1e-4, jacobi_stop="sample")
    full, last, alone = DecodeStats(), DecodeStats(), DecodeStats()
    x_full = model.reverse(noise, y, jacobi_auto_batch=8, stats=full, **kw)  # CPU, 16 guided rows: sequential deep block
    x_last = model.reverse(noise[6:], y_last, jacobi_auto_batch=8, stats=last, **kw)
    assert (last.evaluations, last.tokens) == (full.evaluations, full.tokens)
    torch.testing.assert_close(x_last, x_full[6:], rtol=0, atol=1e-5)
    x_alone = model.reverse(noise[6:], y_last, stats=alone, **kw)  # 4 guided rows: Jacobi chunks of 64
    assert alone.evaluations < full.evaluations
    assert (x_alone - x_full[6:]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="jacobi_auto_batch 0"):
        model.reverse(noise, y, jacobi_auto_batch=0, **kw)


def test_decode_block_jacobi_counts_evaluations() -> None:
    model = tiny()
    block = model.blocks[0]
    z = torch.randn(2, 16, block.in_dim)
    stats = [DecodeStats(), DecodeStats()]
    seq = decode_block(block, z, None, None, guidance=0.0, jacobi=JacobiSettings(), stats=stats[0])
    jac = decode_block(block, z, None, None, guidance=0.0, jacobi=JacobiSettings(True, 8, 0.0, 8), stats=stats[1])
    torch.testing.assert_close(jac, seq, atol=1e-4, rtol=0)
    assert stats[0].evaluations == 16 and stats[1].evaluations == 16  # 2 chunks x 8 iterations



def test_sampling_hands_back_ordinary_tensors_and_training_follows() -> None:
    """reverse runs in inference mode; its results, and the model's cached RoPE table, must still serve autograd."""
    model, noise, y, y_uncond = case("default")
    kept: list[torch.Tensor] = []
    sample = model.reverse(noise, torch.cat([y, y_uncond]), guidance=1.0, intermediates=kept)
    assert not sample.is_inference() and kept and not any(t.is_inference() for t in kept)
    sample.mul_(0.5)  # in place, outside inference mode
    model.train()  # the RoPE table was built by the sampling above; training saves it for backward
    loss = model.loss(sample.requires_grad_(), y)["loss"]
    loss.backward()
    assert sample.grad is not None and sample.grad.abs().sum() > 0

# ------------------------------------------------------------------ guidance
@pytest.mark.parametrize("name", ["default", "text_everywhere", "video", "video_text_everywhere"])
def test_guidance_zero_is_conditional_sampling(name: str) -> None:
    model, noise, y, y_uncond = case(name)
    conditional = model.reverse(noise, y)
    torch.testing.assert_close(model.reverse(noise, torch.cat([y, y_uncond]), guidance=0.0), conditional)
    # identical cond/uncond rows: s = 1 so a = a_c, b = b_c for any weight (SPEC section 8)
    torch.testing.assert_close(model.reverse(noise, torch.cat([y, y]), guidance=3.0), conditional,
                               atol=1e-4, rtol=0)


def test_guidance_changes_the_sample() -> None:
    model, noise, y, y_uncond = case("text_everywhere")
    guided = model.reverse(noise, torch.cat([y, y_uncond]), guidance=2.0)
    assert guided.isfinite().all() and (guided - model.reverse(noise, y)).abs().max() > 1e-3


def test_guidance_needs_uncond_rows() -> None:
    model, noise, y, _ = case("default")
    with pytest.raises(ValueError, match="2B"):
        model.reverse(noise, y, guidance=1.0)


# ------------------------------------------------------------------ patchify
def test_patchify_orders_p1_p2_c() -> None:
    x = torch.arange(2 * 2 * 4, dtype=torch.float32).view(1, 2, 2, 4)  # (B, C, H, W): value = c*8 + h*4 + w
    t = patchify(x, 2)
    assert t.shape == (1, 1, 2, 8)
    # token (0, 1) covers rows 0-1, columns 2-3; last axis ordered (p1, p2, c)
    expected = [x[0, c, p1, 2 + p2].item() for p1 in range(2) for p2 in range(2) for c in range(2)]
    assert t[0, 0, 1].tolist() == expected == [2, 10, 3, 11, 6, 14, 7, 15]


@pytest.mark.parametrize("shape, p", [((2, 3, 8, 4), 2), ((2, 5, 4, 6, 6), 3), ((1, 4, 4, 4), 1)])
def test_patchify_round_trip(shape: tuple[int, ...], p: int) -> None:
    x = torch.randn(shape)
    t = patchify(x, p)
    *lead, c, h, w = shape
    assert t.shape == (*lead, h // p, w // p, p * p * c)
    assert torch.equal(unpatchify(t, p), x)


def test_patchify_names_sides_that_do_not_split_into_patches() -> None:
    with pytest.raises(ValueError, match="6x8 input does not split into 4x4 patches"):
        patchify(torch.zeros(1, 3, 6, 8), 4)


# ------------------------------------------------------------------ official model layouts
OFFICIAL = [
    ("starflow_3B_t2i_256x256.yaml", "keys_starflow_3B_t2i_256x256.json", 3_858_281_544, 0),
    ("starflow-v_7B_t2v_caus_480p.yaml", "keys_starflow-v_7B_t2v_caus_480p.json", 6_890_096_528, 912_884_784),
]


@pytest.mark.parametrize("config, keys, total, denoiser", OFFICIAL)
def test_official_parameter_layout(config: str, keys: str, total: int, denoiser: int) -> None:
    cfg = load_config(REPO / "configs" / config)
    with torch.device("meta"):
        model = STARFlow.from_config(cfg, txt_dim=2048, vae_downsample=vae_geometry(cfg.vae).downsample)
    assert sum(p.numel() for p in model.parameters()) == total
    if model.learnable_self_denoiser is not None:
        assert sum(p.numel() for p in model.learnable_self_denoiser.parameters()) == denoiser
    path = REFERENCE_DIR / keys
    if not path.is_file():
        pytest.skip(f"{path} not found (set STARFLOW_REFERENCE_DIR)")
    reference = json.loads(path.read_text())
    report = compare_layout(model, reference["parameters"])
    assert report.ok, report.describe()
    with_buffers = {**reference["parameters"], **reference["deprecated_buffers"]}
    assert compare_layout(model, with_buffers).ok  # deprecated buffers are accepted and ignored


@pytest.mark.parametrize("config, side", [("starflow_3B_t2i_256x256.yaml", 256 // 8),  # SD-VAE: 8x
                                          ("starflow-v_7B_t2v_caus_480p.yaml", 640 // 16)])  # WAN2.2: 16x
def test_vae_geometry_of_the_official_configs_sets_the_rope_scale(config: str, side: int) -> None:
    small = dict(channels=64, top_block_channels=64, blocks=2, layers_per_block="1 1", pt_seq_len="none")
    cfg = load_config(REPO / "configs" / config, small)
    with torch.device("meta"):
        model = STARFlow.from_config(cfg, txt_dim=8, vae_downsample=vae_geometry(cfg.vae).downsample)
    assert model.pos_scale == side // model.patch_size  # RoPE scale P defaults to latent side / patch
    with pytest.raises(ValueError, match="pass vae_downsample"):  # a VAE config never falls back to pixels
        STARFlow.from_config(cfg, txt_dim=8)


@pytest.mark.parametrize("name, down, temporal", [
    (None, 1, 1), ("stabilityai/sd-vae-ft-ema", 8, 1), ("/data/swanson/sd-vae-ft-ema", 8, 1),
    ("Wan-AI/Wan2.2-TI2V-5B-Diffusers:0.6", 16, 4), ("/models/wan22_vae", 16, 4), ("none", 1, 1)])
def test_vae_geometry_by_name(name: str | None, down: int, temporal: int) -> None:
    g = vae_geometry(name)
    assert (g.downsample, g.temporal_downsample) == (down, temporal)
    assert g.latent_frames(81) == (81 - 1) // temporal + 1


def test_batch_stopping_rule_is_refused_for_sharded_weights() -> None:
    """With ``rank_sync`` (sharded weights) every rank must iterate equally often: only the per-sample rule, which
    reduces its flag over the ranks, keeps them in step; the batch rule would decide per rank (a hang under FSDP2)."""
    model = tiny()
    x, y, _ = inputs(model)
    calls = []
    sync = lambda flag: calls.append(1) or flag  # noqa: E731 - one rank: the reduction is the flag itself
    with pytest.raises(ValueError, match="jacobi_stop 'batch'.*use jacobi_stop 'sample'"):
        model.reverse(x, y, jacobi=True, jacobi_stop="batch", rank_sync=sync)
    out = model.reverse(x, y, jacobi=True, jacobi_stop="sample", rank_sync=sync)
    assert calls and torch.isfinite(out).all()


def test_latents_of_another_layout_are_refused_with_the_model_s_own(tiny_config) -> None:
    """Wrong channels or batch rows get a ValueError naming the expected layout, not a shape error deep in a block."""
    from starflow.config import load_config
    from starflow.models import STARFlow

    cfg = load_config(dict(tiny_config))
    model = STARFlow.from_config(cfg, txt_dim=32, vae_downsample=1)
    y = torch.randn(2, cfg.txt_size, 32)
    with pytest.raises(ValueError, match=f"C = {cfg.channel_size} channels"):
        model(torch.randn(2, cfg.channel_size + 2, 8, 8), y)
    with pytest.raises(ValueError, match="C = .* channels"):
        model.reverse(torch.randn(2, cfg.channel_size + 2, 8, 8), y)
    with pytest.raises(ValueError, match="y has 1 rows for a batch of 2"):
        model(torch.randn(2, cfg.channel_size, 8, 8), y[:1])
    assert model(torch.randn(2, cfg.channel_size, 8, 8), y).z.shape == (2, cfg.channel_size, 8, 8)
