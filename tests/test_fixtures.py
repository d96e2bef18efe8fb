"""Agreement with the reference fixtures produced by the official implementation (SPEC section 15).

``tiny_t2i.pt`` / ``tiny_t2v.pt`` hold a small config, a full state dict in the official layout (deprecated
buffers included), inputs and the official outputs. Everything is float32; agreement to 1e-4 is expected.
The fixtures are looked up in ``$STARFLOW_REFERENCE_DIR`` or ``<repo>/../shared/reference``. The model and
inputs run on ``$STARFLOW_TEST_DEVICE`` (default ``cpu``; e.g. ``cuda``, in float32 without TF32).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from starflow.checkpoint import DEPRECATED_BUFFERS, is_deprecated, load_weights
from starflow.models import STARFlow
from starflow.sampling import self_denoise

ATOL = 1e-4  # float32 against the official implementation
DEFAULT_REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference"
REFERENCE_DIR = Path(os.environ.get("STARFLOW_REFERENCE_DIR", DEFAULT_REFERENCE_DIR))
DEVICE = torch.device(os.environ.get("STARFLOW_TEST_DEVICE", "cpu"))
GUIDANCE = (0.0, 2.5)



def load_fixture(name: str) -> tuple[STARFlow, dict, dict]:
    path = REFERENCE_DIR / f"{name}.pt"
    if not path.is_file():
        pytest.skip(f"reference fixture {path} not found (set STARFLOW_REFERENCE_DIR to the folder holding {name}.pt)")
    fixture = torch.load(path, map_location="cpu", weights_only=False)
    cfg = dict(fixture["config"])
    txt_dim = cfg.pop("txt_dim")  # the text encoder's width: a build argument, not a config key
    model = STARFlow.from_config(cfg, txt_dim=txt_dim).eval()
    load_weights(model, fixture["state_dict"])  # strict; the deprecated buffers are dropped
    if DEVICE.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the fixtures are float32 arithmetic
    inputs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in fixture["inputs"].items()}
    return model.to(DEVICE), inputs, fixture["expected"]


@pytest.fixture(scope="module")
def t2i() -> tuple[STARFlow, dict, dict]:
    return load_fixture("tiny_t2i")


@pytest.fixture(scope="module")
def t2v() -> tuple[STARFlow, dict, dict]:
    return load_fixture("tiny_t2v")


@pytest.fixture(params=["t2i", "t2v"])
def case(request: pytest.FixtureRequest) -> tuple[STARFlow, dict, dict]:
    return request.getfixturevalue(request.param)


def guidance_rows(inputs: dict) -> torch.Tensor:
    return torch.cat([inputs["y"], inputs["y_uncond"]])  # (2B, L, txt_dim) rows [cond; uncond]


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.float().cpu(), expected.float(), rtol=0, atol=ATOL)


def is_video(inputs: dict) -> bool:
    return inputs["x"].dim() == 5  # (B, T, C, H, W)


@pytest.mark.parametrize("name", ["tiny_t2i", "tiny_t2v"])
def test_fixture_state_dict_has_deprecated_buffers(name: str) -> None:
    load_fixture(name)  # skips when absent; loads strictly otherwise
    names = torch.load(REFERENCE_DIR / f"{name}.pt", map_location="cpu", weights_only=False)["state_dict"].keys()
    assert {"var", "feat_rope.freqs_cos", "feat_rope.freqs_sin", "blocks.0.attn_mask"} <= set(names)
    assert len(DEPRECATED_BUFFERS) == 4 and is_deprecated("blocks.2.attn_mask")


@torch.no_grad()
def test_forward_z(case: tuple) -> None:
    model, inputs, expected = case
    assert_close(model(inputs["x"], inputs["y"]).z, expected["forward"]["z"])


@torch.no_grad()
def test_forward_logdets(case: tuple) -> None:
    model, inputs, expected = case
    logdets = model(inputs["x"], inputs["y"]).logdets
    assert len(logdets) == len(expected["forward"]["logdets"])
    b = inputs["x"].shape[0]
    for ours, ref in zip(logdets, expected["forward"]["logdets"]):
        assert_close(ours.reshape(b, -1).mean(1), ref.reshape(b, -1).mean(1))  # per-sample mean, (B,)


@torch.no_grad()
def test_forward_logdet_layout_video(t2v: tuple) -> None:
    model, inputs, expected = t2v
    logdets = model(inputs["x"], inputs["y"]).logdets
    # official: (B, T, F, D) for frame-local shallow blocks, (B, T*F, D) for the deep block
    assert [ld.shape for ld in logdets] == [ld.shape for ld in expected["forward"]["logdets"]]


@torch.no_grad()
def test_loss(case: tuple) -> None:
    model, inputs, expected = case
    assert_close(model.loss(inputs["x"], inputs["y"])["loss"], expected["forward"]["loss"])


@pytest.mark.parametrize("w", GUIDANCE)
def test_reverse_sequential(case: tuple, w: float) -> None:
    model, inputs, expected = case
    assert_close(model.reverse(inputs["noise"], guidance_rows(inputs), guidance=w), expected[f"reverse_cfg{w}"])


@pytest.mark.parametrize("w", GUIDANCE)
def test_jacobi_converged(case: tuple, w: float) -> None:
    model, inputs, expected = case
    # th 0 never stops early; max_iter covers the longest chunk (video chunks may be 4x the block size,
    # plus one iteration for the shifted first guess), so this is the exact fixed point.
    max_iter = 4 * 4 + 1 if is_video(inputs) else 4
    out = model.reverse(inputs["noise"], guidance_rows(inputs), guidance=w, jacobi=True, jacobi_block_size=4,
                        jacobi_th=0.0, jacobi_max_iter=max_iter)
    assert_close(out, expected[f"jacobi_cfg{w}"])


def run_official_jacobi(model: STARFlow, inputs: dict, w: float) -> torch.Tensor:
    return model.reverse(inputs["noise"], guidance_rows(inputs), guidance=w, jacobi=True, jacobi_block_size=4,
                         jacobi_th=1e-3, jacobi_max_iter=32)


@pytest.mark.parametrize("w", GUIDANCE)
def test_jacobi_official_threshold_image(t2i: tuple, w: float) -> None:
    model, inputs, expected = t2i
    assert_close(run_official_jacobi(model, inputs, w), expected[f"jacobi_cfg{w}_th1e-3"])


@pytest.mark.parametrize("w", GUIDANCE)
def test_jacobi_official_threshold_video(t2v: tuple, w: float) -> None:
    model, inputs, expected = t2v
    assert_close(run_official_jacobi(model, inputs, w), expected[f"jacobi_cfg{w}_th1e-3"])


def test_self_denoise(case: tuple) -> None:
    model, inputs, expected = case
    noise_std = 0.5 if is_video(inputs) else 0.3
    assert_close(self_denoise(model, inputs["x"], inputs["y"], noise_std), expected["self_denoise"])


@torch.no_grad()
def test_learnable_denoiser(t2v: tuple) -> None:
    model, inputs, expected = t2v
    assert_close(model.denoiser(inputs["x"], inputs["y"]), expected["denoiser"])



def test_image_to_video(t2v: tuple) -> None:
    model, inputs, expected = t2v
    y_pair = guidance_rows(inputs)
    context = model.encode_context(inputs["x"][:, :1], y_pair)  # frame 0 of x is the (noisy) image prefix
    out = model.reverse(inputs["noise"], y_pair, guidance=2.5, jacobi=True, jacobi_block_size=4, jacobi_th=0.0,
                        jacobi_max_iter=32, context=context)
    assert_close(out[:, :1], expected["ti2v_cfg2.5_first_frame"])
    assert_close(out, expected["ti2v_cfg2.5"])
