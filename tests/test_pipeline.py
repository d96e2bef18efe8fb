"""Text -> pixels on a tiny random pipeline: shapes, Jacobi = sequential, guidance 0 = conditional, truncation."""
from __future__ import annotations

import re

import pytest
import torch

from starflow.sampling.denoise import self_denoise
from starflow.models.jacobi import DecodeStats
from starflow.prompts import prompt_from_config
from starflow.sampling.pipeline import Pipeline, Profile, SampleSettings

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a handwritten digit 1", "a handwritten digit 7", "a handwritten digit 0"]
SEEDS = [0, 1, 2]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def pipe(make_pipeline) -> Pipeline:
    """The tiny pipeline with output layers perturbed by N(0, 0.05^2): a non-trivial flow."""
    return make_pipeline(std=0.05)


def test_guided_sampling_shape_and_range(pipe: Pipeline) -> None:
    profile, stats = Profile(), DecodeStats()
    x = pipe(PROMPTS, SampleSettings(cfg=2.0), seeds=SEEDS, profile=profile, stats=stats)
    assert x.shape == (3, 1, 8, 8) and x.dtype == torch.float32
    assert torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1
    blocks = [pipe.model.block_name(i) for i in reversed(range(pipe.model.num_blocks))]
    assert list(profile.seconds) == ["text encoding", *blocks, "denoising", "VAE decoding"]
    assert stats.evaluations > 0 and sum(profile.evaluations.values()) == stats.evaluations
    unguided = pipe(PROMPTS, SampleSettings(cfg=0.0), seeds=SEEDS)
    assert relative_error(x, unguided) > 1e-3  # guidance changes the samples
    assert torch.equal(x[1:2], pipe(PROMPTS[1:2], SampleSettings(cfg=2.0), seeds=SEEDS[1:2]))  # per-image seeds


def test_the_flow_is_not_trivial(pipe: Pipeline, make_pipeline) -> None:
    identity = make_pipeline(std=0.0)  # zero output layers: the flow maps noise to itself
    a = pipe(PROMPTS, SampleSettings(jacobi=False), seeds=SEEDS)
    b = identity(PROMPTS, SampleSettings(jacobi=False), seeds=SEEDS)
    assert relative_error(a, b) > 0.1


@pytest.mark.parametrize("guidance", [0.0, 2.0])
@pytest.mark.parametrize("block_size", [4, 16])
def test_jacobi_matches_sequential(pipe: Pipeline, guidance: float, block_size: int) -> None:
    seq_stats, jac_stats = DecodeStats(), DecodeStats()
    sequential = pipe(PROMPTS, SampleSettings(cfg=guidance, jacobi=False), seeds=SEEDS, stats=seq_stats)
    jacobi = pipe(PROMPTS, SampleSettings(cfg=guidance, jacobi=True, jacobi_th=1e-4, jacobi_block_size=block_size),
                  seeds=SEEDS, stats=jac_stats)
    assert relative_error(jacobi, sequential) < 1e-2
    assert seq_stats.evaluations == 3 * 16  # one evaluation per token of each of the 3 blocks
    if block_size == 16:
        assert jac_stats.evaluations < seq_stats.evaluations  # the point of Jacobi iteration


def test_jacobi_fixed_point_is_the_sequential_result(make_pipeline) -> None:
    """Without early stopping, k iterations on a chunk of k tokens reproduce sequential decoding exactly."""
    strong = make_pipeline(std=0.2)
    sequential = strong(PROMPTS, SampleSettings(cfg=2.0, jacobi=False, self_denoise=False), seeds=SEEDS)
    jacobi = strong(PROMPTS, SampleSettings(cfg=2.0, jacobi=True, jacobi_th=0.0, jacobi_block_size=16,
                                            jacobi_max_iter=16, self_denoise=False), seeds=SEEDS)
    torch.testing.assert_close(jacobi, sequential, rtol=1e-4, atol=1e-5)


def test_guidance_zero_is_conditional_sampling(pipe: Pipeline) -> None:
    settings = SampleSettings(cfg=0.0, jacobi=False)
    got = pipe(PROMPTS, settings, seeds=SEEDS)
    noise = torch.stack([torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(s)) for s in SEEDS])
    y = pipe.encode_prompts(PROMPTS)  # (B, L, 32): conditional rows only
    x = pipe.model.reverse(noise, y, guidance=0.0, jacobi=False)
    expected = self_denoise(pipe.model, x, y, pipe.config.noise_std).clamp(-1, 1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # with the unconditional rows present and weight 0, the guided formula gives the same (a, b)
    x_rows = pipe.model.reverse(noise, torch.cat([y, pipe.encode_prompts([""] * 3)]), guidance=0.0, jacobi=False)
    torch.testing.assert_close(x_rows, x, rtol=0, atol=1e-6)
    # and a vanishing guidance weight is continuous with it
    tiny_w = pipe(PROMPTS, SampleSettings(cfg=1e-6, jacobi=False), seeds=SEEDS)
    torch.testing.assert_close(tiny_w, got, rtol=1e-4, atol=1e-4)
    unconditional = pipe([""] * 3, settings, seeds=SEEDS)
    assert relative_error(got, unconditional) > 1e-3  # the text matters, so the check above is not vacuous


def test_long_prompt_warns_about_truncation_and_samples(pipe: Pipeline) -> None:
    long = "a handwritten digit 7 written slowly with a thick black marker on white paper"  # > 24 byte tokens
    assert len(long.encode()) > pipe.config.txt_size
    with pytest.warns(UserWarning, match=f"truncated to {pipe.config.txt_size} tokens"):
        x = pipe([long, "a handwritten digit 2"], SampleSettings(cfg=2.0), seeds=[0, 1])
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()
    # only the first txt_size tokens count: the same prompt with a different tail samples the same image
    with pytest.warns(UserWarning):
        other_tail = pipe([long[:40] + " and nothing else at all", "a handwritten digit 2"],
                          SampleSettings(cfg=2.0), seeds=[0, 1])
    torch.testing.assert_close(other_tail, x, rtol=0, atol=0)


def test_short_prompts_do_not_warn(pipe: Pipeline, recwarn) -> None:
    pipe(PROMPTS[:1], SampleSettings(cfg=2.0), seeds=[0])
    assert not [w for w in recwarn if "truncated" in str(w.message)]


def test_template_tags_past_txt_size_are_cut_silently(make_pipeline, recwarn) -> None:
    """A caption that fits, whose template tags (here the aspect ratio) run past txt_size: truncated as in training,
    without a warning; a caption that is itself too long still warns."""
    pipe = make_pipeline(mix_aspect=1)
    caption = "a handwritten digit 2"
    encoder, template = pipe.text_encoder, prompt_from_config(caption, pipe.config, "1:1")
    assert encoder.token_counts([caption])[0] <= pipe.config.txt_size < encoder.token_counts([template])[0]
    x = pipe.encode_prompts([caption])
    assert not [w for w in recwarn if "truncated" in str(w.message)]
    torch.testing.assert_close(x, encoder([template]), rtol=0, atol=0)  # the same truncated encoding
    with pytest.warns(UserWarning, match="truncated"):
        pipe.encode_prompts(["a handwritten digit 7 written slowly with a thick black marker"])


def test_default_jacobi_on_the_demo_is_close_to_sequential_with_far_fewer_evaluations() -> None:
    """The sampler's default Jacobi settings on the shipped demo: within 1e-2 (relative) of sequential decoding
    of the same noise; for one image (64-token chunks) with at least 4x fewer sequential model evaluations, for 8
    (on a CPU the guided deep block of 16 rows then decodes token by token) with fewer. Wall time:
    benchmarks/sampling.py."""
    from starflow.assets import DEMO_DIR

    pipe = Pipeline.from_pretrained(DEMO_DIR)
    defaults = SampleSettings()
    assert defaults.jacobi_block_size == "auto"
    prompts = [f"a handwritten digit {d}" for d in range(8)]
    y = torch.cat([pipe.encode_prompts(prompts), pipe.encode_prompts([""] * len(prompts))])
    noise = torch.randn(len(prompts), *pipe.latent_shape(), generator=torch.Generator().manual_seed(0))
    for rows in ([0], list(range(8))):
        yb = torch.cat([y[rows], y[[r + 8 for r in rows]]])
        seq_stats, jac_stats = DecodeStats(), DecodeStats()
        seq = pipe.model.reverse(noise[rows], yb, guidance=pipe.config.cfg, stats=seq_stats)
        jac = pipe.model.reverse(noise[rows], yb, guidance=pipe.config.cfg, jacobi=True, stats=jac_stats,
                                 jacobi_block_size=defaults.jacobi_block_size, jacobi_th=defaults.jacobi_th,
                                 jacobi_max_iter=defaults.jacobi_max_iter, jacobi_stop=defaults.jacobi_stop)
        assert relative_error(jac, seq) < 1e-2
        assert seq_stats.evaluations == 4 * 64  # one per token of each of the 4 blocks of 8x8 tokens
        if len(rows) == 1:
            assert jac_stats.evaluations * 4 <= seq_stats.evaluations
        else:
            assert 64 < jac_stats.evaluations < seq_stats.evaluations


@pytest.mark.parametrize("bad", [dict(block_size=0), dict(max_iter=0), dict(threshold=-1.0)])
def test_jacobi_settings_reject_values_that_would_never_finish(bad: dict) -> None:
    from starflow.models.jacobi import JacobiSettings

    with pytest.raises(ValueError, match="block_size >= 1"):
        JacobiSettings(enabled=True, **bad)


def test_truncation_warnings_are_bounded(make_pipeline, recwarn) -> None:
    """An encoder remembers only the prompts it reported (not every prompt it saw), and stops checking after
    ``TRUNCATION_WARNINGS`` warnings, saying so: a run over millions of captions keeps no per-caption state."""
    from starflow.adapters.text import TRUNCATION_WARNINGS

    encoder = make_pipeline().text_encoder
    fitting = [f"digit {i}" for i in range(50)]
    encoder.encode_templated(fitting, [f"{c} with a long template tail past txt_size" for c in fitting])
    assert not encoder._warned and not recwarn
    for i in range(TRUNCATION_WARNINGS + 5):
        encoder([f"prompt {i} written out at a length well past the twenty-four tokens"])
    messages = [str(w.message) for w in recwarn if "truncated" in str(w.message)]
    assert len(messages) == TRUNCATION_WARNINGS == len(encoder._warned)
    assert messages[-1].endswith("further truncated prompts are not reported")


@pytest.mark.parametrize("call, message", [
    (lambda p, img, m: p.inpaint(PROMPTS[:2], img, m, SampleSettings()), "3 item(s) for 2 prompt(s)"),
    (lambda p, img, m: p.inpaint(PROMPTS, img, m, SampleSettings(), seeds=SEEDS[:2]), "2 seed(s) for 3 sample(s)"),
    (lambda p, img, m: p(PROMPTS[:2], SampleSettings(), seeds=SEEDS), "3 seed(s) for 2 sample(s)"),
    (lambda p, img, m: p.inpaint(PROMPTS, img * 127.5 + 127.5, m, SampleSettings()), "pixels must be in [-1, 1]"),
    (lambda p, img, m: p.edit(PROMPTS, PROMPTS, img.expand(3, 3, 8, 8), SampleSettings()),
     "has 3 channel(s) (dimension -3); this model samples grayscale images"),
    (lambda p, img, m: p.inpaint(PROMPTS, img.where(img.isnan(), torch.nan), m, SampleSettings()),
     "input image holds 192 NaN or infinite value(s)"),
    (lambda p, img, m: p.inpaint(PROMPTS, (img > 0).to(torch.uint8), m, SampleSettings()),
     "input image is a torch.uint8 tensor; pixels must be floats in [-1, 1]"),  # 0/1 values would pass the range
    (lambda p, img, m: p.edit(PROMPTS, PROMPTS, img > 0, SampleSettings()), "is a torch.bool tensor"),
    (lambda p, img, m: p.model(img.to(torch.uint8)), "x is a torch.uint8 tensor: the flow takes float latents"),
])
def test_api_inputs_that_do_not_fit_the_prompts_or_the_model_are_refused(pipe: Pipeline, call, message) -> None:
    img = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8).repeat(3, 1, 1, 1)
    mask = torch.zeros(8, 8)
    mask[4:] = 1
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        call(pipe, img, mask)
    assert pipe.inpaint(PROMPTS, img, mask, SampleSettings(), seeds=SEEDS).shape == img.shape  # the fitting call runs


@pytest.mark.parametrize("call, error, message", [
    (lambda p: p("a handwritten digit 1", SampleSettings()), TypeError, "wrap a single caption in a list"),
    (lambda p: p([], SampleSettings()), ValueError, "no prompts"),
    (lambda p: p(PROMPTS, SampleSettings(aspect_ratio="16:9")), ValueError, "trained on square 8x8 samples only"),
    (lambda p: SampleSettings(cfg=-1.0), ValueError, "cfg -1: the guidance weight must be >= 0"),
    (lambda p: SampleSettings(temperature=float("nan")), ValueError, "temperature nan"),
    (lambda p: SampleSettings(jacobi_th=float("nan")), ValueError, "jacobi_th nan"),
    (lambda p: SampleSettings(jacobi_stop="never"), ValueError, "jacobi_stop never: must be sample or batch"),
    (lambda p: SampleSettings(denoising_batch_size=0), ValueError, "denoising_batch_size 0: must be >= 1"),
    (lambda p: SampleSettings(cfg=float("inf")), ValueError, "cfg inf: the guidance weight must be >= 0 and finite"),
    (lambda p: SampleSettings(self_denoising_lr=float("inf")), ValueError, "self_denoising_lr inf: must be a finite"),
    (lambda p: p(PROMPTS[:1], SampleSettings(cfg=2.0, guide_top=1)), ValueError,
     "guide_top 1: this model (cond_top_only) reads the text in its deep block alone"),
    (lambda p: SampleSettings(attn_temp=float("inf")), ValueError, "attn_temp inf: must be a finite number"),
    (lambda p: SampleSettings(cfg="2"), TypeError, "cfg '2': must be a number"),
    (lambda p: p(PROMPTS, {"cfg": 2}), TypeError, "settings must be a SampleSettings, got dict"),
    (lambda p: p(PROMPTS[:1], SampleSettings(), seeds=["5"]), TypeError, "seeds must be a list of integers"),
    (lambda p: p(PROMPTS[:1], SampleSettings(), seeds=5), TypeError, "seeds must be a list of integers"),
    (lambda p: p(PROMPTS[:1], SampleSettings(), seeds=[2**64]), ValueError, "seeds must fit in 64 bits"),
    (lambda p: p(PROMPTS[:1], SampleSettings(cfg=2.0, guide_top=99)), ValueError, "guide_top 99: the number of guided blocks must be in 0..3"),
    (lambda p: p(PROMPTS[:1], SampleSettings(attn_temp=2.0)), ValueError, "attn_temp acts through classifier-free guidance"),
    (lambda p: p(PROMPTS[:1], SampleSettings(), negative_prompts=["x"]), ValueError, "negative prompts act through classifier-free guidance"),
    (lambda p: p(PROMPTS[:1], SampleSettings(cfg=2.0), negative_prompts="x"), TypeError,
     "negative_prompts must be a list of strings"),
    (lambda p: p(PROMPTS[:1], SampleSettings(fps=8)), ValueError, "fps is for video configs"),
    (lambda p: p.encode_prompts("abc"), TypeError, "wrap a single caption in a list"),
    (lambda p: p(iter(PROMPTS), SampleSettings()), TypeError, "(and make a generator a list)"),
])
def test_api_prompts_and_settings_that_no_sampler_could_use_are_refused(pipe: Pipeline, call, error, message) -> None:
    with pytest.raises(error, match=re.escape(message)):
        call(pipe)


def test_sampling_inside_inference_mode_matches_sampling_outside(pipe: Pipeline) -> None:
    """The Tweedie step needs a gradient: it leaves a caller's inference_mode for it."""
    want = pipe(PROMPTS, SampleSettings(cfg=2.0), seeds=SEEDS)
    with torch.inference_mode():
        assert torch.equal(pipe(PROMPTS, SampleSettings(cfg=2.0), seeds=SEEDS), want)
    from starflow.assets import DEMO_DIR

    with torch.inference_mode():  # loaded inside it too
        demo = Pipeline.from_pretrained(DEMO_DIR)
        assert not next(demo.model.parameters()).is_inference()
        sample = demo(PROMPTS[:1], demo.default_settings(), seeds=SEEDS[:1])
    assert torch.equal(sample, Pipeline.from_pretrained(DEMO_DIR)(PROMPTS[:1], demo.default_settings(), seeds=SEEDS[:1]))
    with torch.inference_mode():  # a model made inside it has no gradient to give: said, not a deep autograd error
        made = type(pipe.model).from_config(pipe.config, txt_dim=pipe.model.txt_dim)
    with pytest.raises(RuntimeError, match="parameters were made under torch.inference_mode"):
        self_denoise(made, torch.zeros(1, 1, 8, 8), torch.zeros(1, pipe.config.txt_size, pipe.model.txt_dim), 0.1)


def test_numpy_seeds_are_seeds(pipe: Pipeline) -> None:
    np = pytest.importorskip("numpy")
    ints = pipe(PROMPTS[:2], SampleSettings(), seeds=SEEDS[:2])
    assert torch.equal(pipe(PROMPTS[:2], SampleSettings(), seeds=list(np.array(SEEDS[:2]))), ints)


def test_from_pretrained_names_a_config_given_as_weights_and_a_dtype_string() -> None:
    from starflow.assets import DEMO_DIR

    with pytest.raises(ValueError, match="config.yaml is a config, not weights: pass the model folder"):
        Pipeline.from_pretrained(DEMO_DIR / "config.yaml")
    with pytest.raises(TypeError, match=re.escape("dtype 'bfloat16': pass a torch.dtype, e.g. torch.bfloat16")):
        Pipeline.from_pretrained(DEMO_DIR, dtype="bfloat16")


def test_default_settings_reproduce_the_cli(tmp_path) -> None:
    """The demo's CLI samples (seed + i per file, the config's cfg, "auto" chunks for --sample_batch_size) are the
    API's with :meth:`Pipeline.default_settings`."""
    import numpy as np
    from PIL import Image

    from starflow.assets import DEMO_DIR
    from starflow.cli import main
    from starflow.sampling.io import to_uint8

    assert main(["sample", "--caption", "a handwritten digit 3", "--num_samples", "2", "--seed", "5",
                 "--output_dir", str(tmp_path), "--device", "cpu"]) == 0
    files = sorted(tmp_path.glob("0000*.png"))
    pipe = Pipeline.from_pretrained(DEMO_DIR)
    assert pipe.default_settings().cfg == pipe.config.cfg > 0
    images = to_uint8(pipe(["a handwritten digit 3"] * 2, pipe.default_settings(), seeds=[5, 6]))
    assert [f.name for f in files] == ["00000_a_handwritten_digit_3.png", "00001_a_handwritten_digit_3.png"]
    for f, image in zip(files, images, strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(f)), image[..., 0])
