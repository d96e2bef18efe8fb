"""Text conditioning: a frozen T5 encoder (the prompt template is in :mod:`starflow.prompts`).

STARFlow (arXiv 2506.06276) Sec. 3 conditions the deep flow block on the hidden states of a frozen
pretrained T5 encoder (``google/flan-t5-xl``, hidden size 2048). The masking of padding follows
SPEC Sec. 12. A tiny randomly initialised T5 (:func:`build_tiny_text_encoder`)
goes through exactly the same code path for tests and demos.
"""

from __future__ import annotations

import os
import pickle
import warnings

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoTokenizer, ByT5Tokenizer, PreTrainedTokenizerBase, T5Config, T5EncoderModel

from starflow.adapters.hub import (check_local_folder, missing_model_error, resolve_local_files_only,
                                   weights_error)

T5_DEFAULT = "google/flan-t5-xl"
"""Hub id of the text encoder of the released checkpoints (encoder only, hidden size 2048)."""

TRUNCATION_WARNINGS = 20
"""Warnings about prompts longer than ``txt_size`` one encoder gives before it stops checking (it says so)."""

TINY_T5: dict[str, int] = dict(vocab_size=384, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2)
"""``T5Config`` arguments of the debug encoder; vocab 384 matches ``ByT5Tokenizer`` (bytes + specials)."""


class TextEncoder(nn.Module):
    """A frozen T5 encoder that turns prompts into padded, masked token features.

    The encoder stays in eval mode (no dropout) even when a parent module calls ``.train()``, its
    parameters have ``requires_grad=False`` and :meth:`forward` runs under ``torch.no_grad``.

    Args:
        tokenizer: The T5 tokenizer (``T5TokenizerFast`` for flan-t5, ``ByT5Tokenizer`` for the tiny one).
        encoder: A ``T5EncoderModel`` (encoder only: ``AutoModel`` would build a random decoder too).
        max_length: Tokens per prompt after padding/truncation; config ``txt_size`` (L).
        name: Where the model came from, for messages.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, encoder: T5EncoderModel, max_length: int,
                 name: str = "") -> None:
        super().__init__()
        if max_length <= 0:
            raise ValueError(f"txt_size (max_length) must be positive, got {max_length}")
        self.tokenizer = tokenizer
        self.encoder = encoder.eval().requires_grad_(False)
        self.max_length = max_length
        self.name = name
        self._warned: set[str] = set()  # prompts reported as truncated (at most TRUNCATION_WARNINGS batches' worth)
        self._warnings = 0

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = T5_DEFAULT,
        *,
        max_length: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        local_files_only: bool | None = None,
    ) -> TextEncoder:
        """Load tokenizer and encoder from a local folder, the HF cache, or the Hub (in that order).

        Args:
            name_or_path: Hub id (``google/flan-t5-xl``) or a folder written by :meth:`save_pretrained`.
            max_length: Config ``txt_size`` (L).
            dtype: Weight dtype; flan-t5 is known to overflow in float16, prefer float32 or bfloat16.
            device: Where the encoder runs.
            local_files_only: True: never contact the Hub; None: True iff ``HF_HUB_OFFLINE`` is set.

        Returns:
            The frozen text encoder.

        Raises:
            FileNotFoundError: The model is neither in the folder, the cache, nor (when allowed)
                reachable on the Hub; the message says how to download it.
        """
        what = "T5 text encoder"
        check_local_folder(name_or_path, what)
        offline = resolve_local_files_only(local_files_only)
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=offline)
            encoder = T5EncoderModel.from_pretrained(name_or_path, dtype=dtype, local_files_only=offline)
        except OSError as err:
            raise missing_model_error(name_or_path, what, cause=err) from err
        except (pickle.UnpicklingError, SafetensorError) as err:  # (a download cut short, a file not weights)
            raise weights_error(name_or_path, what, err) from None
        return cls(tokenizer, encoder.to(device), max_length, name=name_or_path)

    def save_pretrained(self, folder: str | os.PathLike[str]) -> None:
        """Write tokenizer and encoder so that :meth:`from_pretrained` on ``folder`` restores them.

        Args:
            folder: Destination folder; created if missing.
        """
        self.tokenizer.save_pretrained(folder)
        self.encoder.save_pretrained(folder)

    @property
    def hidden_size(self) -> int:
        """Width of the token features: the ``txt_dim`` the flow is built with (:meth:`STARFlow.from_config`); 2048
        for flan-t5-xl."""
        return int(self.encoder.config.d_model)

    @property
    def device(self) -> torch.device:
        """Device of the encoder weights."""
        return next(self.encoder.parameters()).device

    def train(self, mode: bool = True) -> TextEncoder:
        """Set the training flag of this wrapper; the frozen encoder itself stays in eval mode."""
        super().train(mode)
        self.encoder.eval()
        return self

    def token_counts(self, prompts: list[str]) -> list[int]:
        """Tokens of each prompt before padding and truncation (the end-of-sequence token included)."""
        return [len(ids) for ids in self.tokenizer(list(prompts), truncation=False)["input_ids"]]

    def encode_templated(self, captions: list[str], prompts: list[str]) -> torch.Tensor:
        """Encode ``prompts``, the ``captions`` with their template tags (SPEC section 12), warning only about a caption
        that is itself longer than ``max_length`` tokens: tags that run past it after a caption that fits are cut
        silently, the same cut in training and in sampling.

        Args:
            captions: B captions; prompts: the B prompts made from them.

        Returns:
            ``(B, L, D_txt)`` as :meth:`forward`.
        """
        self._warn_truncated(list(captions))
        return self._encode(list(prompts))

    def _warn_truncated(self, texts: list[str]) -> None:
        """One warning naming the texts with more than ``max_length`` tokens (counted before truncation) not reported
        before. Only reported texts are remembered, and after :data:`TRUNCATION_WARNINGS` warnings the check stops
        (saying so), so a training run over millions of captions neither keeps them nor warns without end."""
        if self._warnings >= TRUNCATION_WARNINGS:
            return
        new = [p for p in dict.fromkeys(texts) if p not in self._warned]
        long = [(p, n) for p, n in zip(new, self.token_counts(new)) if n > self.max_length] if new else []
        if not long:
            return
        self._warned.update(p for p, _ in long)
        self._warnings += 1
        shown = ", ".join(f"{p[:50] + ('...' if len(p) > 50 else '')!r} ({n} tokens)" for p, n in long[:3])
        more = f" and {len(long) - 3} more" if len(long) > 3 else ""
        last = ("; further truncated prompts are not reported" if self._warnings == TRUNCATION_WARNINGS else "")
        warnings.warn(f"{len(long)} prompt(s) have more than txt_size={self.max_length} tokens and are truncated to "
                      f"{self.max_length} tokens: {shown}{more}{last}", stacklevel=3)

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> torch.Tensor:
        """Encode prompts (already templated with :func:`apply_prompt_template`).

        Args:
            prompts: B strings.

        Returns:
            Token features ``(B, L, D_txt)`` float32 with ``L = max_length`` and ``D_txt = hidden_size``;
            rows of padding tokens are exactly zero (hidden states multiplied by the attention mask).
        """
        prompts = list(prompts)
        self._warn_truncated(prompts)
        return self._encode(prompts)

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(prompts, padding="max_length", max_length=self.max_length,
                               truncation=True, return_tensors="pt")
        input_ids = batch["input_ids"].to(self.device)  # (B, L)
        mask = batch["attention_mask"].to(self.device)  # (B, L), 1 = real token
        hidden = self.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (B, L, D_txt)
        return hidden.float() * mask[..., None].float()


def build_tiny_text_encoder(max_length: int, seed: int = 0,
                            config: dict[str, int] | None = None) -> TextEncoder:
    """A tiny randomly initialised T5 encoder with a byte tokenizer, built without any files.

    Used by tests, demos and the debug configs; it is loaded, saved and run through the same code as
    flan-t5-xl (``save_pretrained`` then :meth:`TextEncoder.from_pretrained` round-trips).

    Args:
        max_length: Config ``txt_size`` (L).
        seed: Seed of the weight initialisation (the global RNG state is left untouched).
        config: ``T5Config`` arguments; default :data:`TINY_T5` (hidden size 32).

    Returns:
        The frozen tiny text encoder on CPU in float32.
    """
    t5_config = T5Config(**(TINY_T5 if config is None else config))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = T5EncoderModel(t5_config)
    return TextEncoder(ByT5Tokenizer(), encoder, max_length, name="tiny-t5")
