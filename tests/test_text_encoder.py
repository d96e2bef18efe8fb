"""Prompt template (SPEC Sec. 12) and the frozen T5 text encoder, on a tiny offline T5."""

from __future__ import annotations

import time
import warnings

import pytest
import torch

from starflow.adapters.hub import resolve_local_files_only
from starflow.adapters.text import TINY_T5, TextEncoder, build_tiny_text_encoder
from starflow.prompts import apply_prompt_template

TXT_SIZE = 16


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return build_tiny_text_encoder(TXT_SIZE)


# (fps_cond, cond_noise_level, mix_aspect) -> expected, for text "cat", fps 16, noise_std 0.3, ratio 16:9.
TEMPLATE_CASES = {
    (False, False, False): "cat",
    (True, False, False): "A video with 16 fps:\ncat\n",
    (False, True, False): "Noise Level 300:\ncat",
    (False, False, True): "cat\n in a 16:9 aspect ratio.\n",
    (True, True, False): "Noise Level 300:\nA video with 16 fps:\ncat\n",
    (True, False, True): "A video with 16 fps:\ncat\n\n in a 16:9 aspect ratio.\n",
    (False, True, True): "Noise Level 300:\ncat\n in a 16:9 aspect ratio.\n",
    (True, True, True): "Noise Level 300:\nA video with 16 fps:\ncat\n\n in a 16:9 aspect ratio.\n",
}


@pytest.mark.parametrize("flags", list(TEMPLATE_CASES))
def test_template_all_flag_combinations(flags: tuple[bool, bool, bool]) -> None:
    fps_cond, cond_noise_level, mix_aspect = flags
    text = apply_prompt_template("cat", fps=16, fps_cond=fps_cond, cond_noise_level=cond_noise_level,
                                 noise_std=0.3, mix_aspect=mix_aspect, aspect_ratio="16:9")
    assert text == TEMPLATE_CASES[flags]


@pytest.mark.parametrize("fps", [None, 0])
def test_template_image_prefix_and_empty_prompt(fps: int | None) -> None:
    text = apply_prompt_template("", fps=fps, fps_cond=True, cond_noise_level=True, noise_std=0.3,
                                 mix_aspect=True)
    assert text == "Noise Level 300:\nAn image:\n\n\n in a 1:1 aspect ratio.\n"


def test_template_noise_level_truncates_like_int() -> None:
    # The official template truncates with int(), it does not round.
    assert apply_prompt_template("x", cond_noise_level=True, noise_std=0.2999) == "Noise Level 299:\nx"
    assert apply_prompt_template("x", cond_noise_level=True, noise_std=0.0) == "Noise Level 0:\nx"
    # fps without fps_cond changes nothing.
    assert apply_prompt_template("x", fps=24) == "x"


def test_shape_dtype_and_padding_is_zero(encoder: TextEncoder) -> None:
    prompts = ["a cat", ""]
    out = encoder(prompts)
    assert out.shape == (2, TXT_SIZE, TINY_T5["d_model"]) and out.dtype == torch.float32
    assert encoder.hidden_size == TINY_T5["d_model"]
    # ByT5: one token per byte plus EOS, so 6 and 1 real tokens.
    mask = encoder.tokenizer(prompts, padding="max_length", max_length=TXT_SIZE,
                             return_tensors="pt")["attention_mask"].bool()
    assert mask.sum(1).tolist() == [6, 1]
    assert torch.all(out[~mask] == 0)
    assert torch.all(out[mask].abs().sum(-1) > 0)


def test_batch_composition_does_not_change_features(encoder: TextEncoder) -> None:
    alone = encoder(["a cat"])
    batched = encoder(["a cat", "a dog on a sofa"])
    torch.testing.assert_close(alone[0], batched[0], rtol=1e-5, atol=1e-6)


def test_frozen_and_stays_in_eval(encoder: TextEncoder) -> None:
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert encoder.training and not encoder.encoder.training
    encoder.eval()
    assert not encoder(["a"]).requires_grad


def test_truncation_warning(encoder: TextEncoder) -> None:
    long_prompt = "a very long prompt about a cat sitting on a sofa"
    with pytest.warns(UserWarning, match=rf"txt_size={TXT_SIZE}") as record:
        out = encoder([long_prompt])
    assert "a very long prompt" in str(record[0].message)
    assert out.shape == (1, TXT_SIZE, TINY_T5["d_model"]) and torch.all(out.abs().sum(-1) > 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder(["short", "x" * (TXT_SIZE - 1)])  # 15 bytes + EOS = exactly txt_size: no warning


def test_seeded_build_leaves_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    a, b = build_tiny_text_encoder(8, seed=0), build_tiny_text_encoder(8, seed=0)
    c = build_tiny_text_encoder(8, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a(["hi"]), b(["hi"])) and not torch.equal(a(["hi"]), c(["hi"]))


def test_save_load_round_trip(encoder: TextEncoder, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    encoder.save_pretrained(tmp_path)
    loaded = TextEncoder.from_pretrained(str(tmp_path), max_length=TXT_SIZE)
    prompts = ["a cat", "", "a very long prompt that will be truncated"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(loaded(prompts), encoder(prompts))
    assert type(loaded.tokenizer) is type(encoder.tokenizer)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.encoder.training


def test_offline_env_read_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_local_files_only(None) is True
    assert resolve_local_files_only(False) is False


@pytest.mark.parametrize("kind", ["missing_folder", "empty_folder", "hub_id"])
def test_missing_model_fails_fast_with_help(kind: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = {"missing_folder": str(tmp_path / "no-such-folder"), "empty_folder": str(tmp_path),
            "hub_id": "starflow-tests/no-such-model"}[kind]
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as info:
        TextEncoder.from_pretrained(name, max_length=8)
    assert time.perf_counter() - start < 5.0
    message = str(info.value)
    assert name in message and "T5 text encoder" in message
    if kind == "hub_id":
        assert "hf download starflow-tests/no-such-model" in message and "HF_HUB_OFFLINE=1" in message


def test_unreachable_hub_is_named_in_the_error() -> None:
    import socket

    from starflow.adapters.hub import missing_model_error, network_failure

    class ConnectError(Exception):  # the HTTP client's class name (httpx), not a ConnectionError subclass
        pass

    def loader_error(inner: BaseException) -> OSError:  # the chain transformers/diffusers raise when offline
        try:
            try:
                raise ConnectError("[Errno -2] Name or service not known") from inner
            except ConnectError as e:
                raise OSError("org/model does not appear to have a file named config.json.") from e
        except OSError as e:
            return e

    cause = loader_error(socket.gaierror(-2, "Name or service not known"))
    assert type(network_failure(cause)).__name__ == "ConnectError"
    message = str(missing_model_error("org/model", "SD-VAE", cause=cause))
    assert "could not be reached (ConnectError: [Errno -2] Name or service not known)" in message
    assert "HF_HUB_OFFLINE=1 to skip" in message
    plain = OSError("org/model does not appear to have a file named config.json.")
    assert network_failure(plain) is None
    assert "could not be reached" not in str(missing_model_error("org/model", "SD-VAE", cause=plain))


def test_a_run_records_a_local_t5_beside_its_config_so_export_finds_it(tiny_config, digits, tmp_path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``text: my_t5`` (a T5 folder beside the config): the run records its absolute path, so ``starflow export`` of a
    checkpoint from another working folder writes a model folder that carries the encoder and samples."""
    import yaml

    from starflow.cli import main
    from starflow.config import load_config

    configs = tmp_path / "configs"
    build_tiny_text_encoder(tiny_config["txt_size"], seed=5).save_pretrained(configs / "my_t5")
    (configs / "config.yaml").write_text(yaml.safe_dump(dict(tiny_config, text="my_t5", steps=2, save_freq=1)))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["train", "--config", str(configs / "config.yaml"), "--data", str(digits["train"]), "--logdir",
                 str(tmp_path / "run"), "--device", "cpu"]) == 0
    assert load_config(tmp_path / "run" / "config.yaml").text == str((configs / "my_t5").resolve())
    assert main(["export", str(tmp_path / "run" / "checkpoints" / "step_00000001"), str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported" / "text_encoder" / "config.json").is_file()
    assert main(["sample", "--checkpoint_path", str(tmp_path / "exported"), "--caption", "a handwritten digit 2",
                 "--num_samples", "1", "--output_dir", str(tmp_path / "s"), "--device", "cpu"]) == 0
