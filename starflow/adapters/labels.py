"""Class labels as conditioning: a ``.vocab`` file of class names instead of a text encoder (SPEC section 16).

Config ``text: NAME.vocab`` (one class name per line) with ``txt_size: 1``: class ``k`` is one text token, row
``k`` of ``eye(K + 1)``, so ``txt_dim = K + 1``; the empty name is row ``K``, the unconditional label of caption
dropout (``drop_label``) and of guidance. This is the official ``LookupTableTokenizer`` + ``LabelEmbdder``.
A :class:`LabelEncoder` is called like a :class:`~starflow.adapters.text.TextEncoder`.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

__all__ = ["LabelEncoder", "VOCAB_SUFFIX", "is_vocab", "read_vocab"]

VOCAB_SUFFIX = ".vocab"


def is_vocab(text: str | None) -> bool:
    """Whether a config ``text`` entry names a class vocabulary (``*.vocab``)."""
    return text is not None and text.endswith(VOCAB_SUFFIX)


def read_vocab(path: str | Path) -> list[str]:
    """The class names of a ``.vocab`` file, one per non-empty line.

    Raises:
        FileNotFoundError: no such file.
        ValueError: no names, or a name twice.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class vocabulary {path} not found (config key 'text': a .vocab file, one class "
                                "name per line; relative paths resolve against the config's folder)")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{path} lists no class names (one per line)")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{path} lists class names twice: {twice}")
    return names


class LabelEncoder(nn.Module):
    """Class names -> one-hot text tokens ``(B, 1, K + 1)``.

    Args:
        names: the K class names (row ``k`` is class ``names[k]``).
        name: where they came from (the ``.vocab`` file), for messages and :meth:`save_pretrained`.
    """

    def __init__(self, names: list[str], name: str = "") -> None:
        super().__init__()
        self.names, self.name = list(names), name
        self.index = {n: i for i, n in enumerate(self.names)}
        self.hidden_size = len(self.names) + 1
        self.max_length = 1

    @classmethod
    def from_file(cls, path: str | Path) -> "LabelEncoder":
        """Read a ``.vocab`` file (see :func:`read_vocab`)."""
        return cls(read_vocab(path), name=str(path))

    def ids(self, prompts: list[str]) -> list[int]:
        """Row of each prompt: its class index, ``K`` for ``""``.

        Raises:
            ValueError: a prompt that is no class name (every unknown one listed, with the classes).
        """
        unknown = sorted({p for p in prompts if p.strip() and p.strip() not in self.index})
        if unknown:
            raise ValueError(f"{unknown} are not classes of {self.name or 'the vocabulary'}: use one of {self.names}")
        return [self.index[p.strip()] if p.strip() else len(self.names) for p in prompts]

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> torch.Tensor:
        """``(B, 1, K + 1)`` float32 one-hot rows."""
        eye = torch.eye(self.hidden_size)
        return eye[self.ids(prompts)][:, None]

    def encode_templated(self, captions: list[str], prompts: list[str]) -> torch.Tensor:
        """:meth:`forward` of ``prompts``: ``(B, 1, K + 1)`` float32 one-hot rows (the interface of
        :meth:`TextEncoder.encode_templated`; class names are looked up whole, never truncated, so ``captions`` is not
        needed)."""
        return self(prompts)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the vocabulary as ``folder/<its file name>``; returns the written file."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / (Path(self.name).name if self.name.endswith(VOCAB_SUFFIX) else "classes" + VOCAB_SUFFIX)
        if Path(self.name).is_file() and Path(self.name).resolve() != target.resolve():
            shutil.copyfile(self.name, target)
        elif not target.is_file():
            target.write_text("\n".join(self.names) + "\n", encoding="utf-8")
        return target
