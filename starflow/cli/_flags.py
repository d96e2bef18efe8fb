"""Flags shared by several commands: every config key as a flag, the weights-writing flags, ``--device``."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from starflow.config import CONFIG_FIELDS, TRAINING_KEYS, Config, config_field_help
from starflow.files import check_writable

SAMPLING_SKIP = frozenset({"ema", "compile"})
"""Config keys the sampling commands do not take as flags because a switch of their own has the name (``--ema``:
sample the EMA weights; ``--compile``: compile the flow layers)."""

LORA_KEYS = frozenset({"lora_rank", "lora_alpha", "lora_targets"})
SAMPLING_REJECT = {**dict.fromkeys(TRAINING_KEYS),
                   **dict.fromkeys(LORA_KEYS, "the weights it samples have any LoRA adapters merged in")}
"""The config keys the sampling commands refuse as flags, with why: training keys, and those of a LoRA fine-tune (its
model folder records them, but its weights have the adapters merged in)."""

__all__ = ["say_error", "SAMPLING_SKIP", "SAMPLING_REJECT", "OneLineErrors", "add_config_flags", "config_overrides",
           "add_weights_io_flags", "add_device_flag", "DTYPES", "check_input_files", "about_flag", "output_folder",
           "read_text_lines", "check_output_path", "is_rank0", "note_once", "forget_notes"]


class OneLineErrors(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line on stderr, ``error: PROG: message (see PROG --help)``,
    with exit code 2, instead of the whole usage block (subcommand parsers inherit the class).

    Attributes:
        commands: the subcommand parsers by name (set by :func:`starflow.cli.build_parser`).
    """

    commands: dict[str, argparse.ArgumentParser] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # --step 3 is not --steps 3: a mistyped flag is an error, not a guess
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D102 - argparse's hook
        missing = re.fullmatch(r"argument (--\w+)(?:/\S+)?: expected one argument", message)
        if missing:  # argparse reads a value such as -1,4,8,8 as a flag
            message += f"; a value that starts with '-' goes after '=': {missing.group(1)}=VALUE"
        self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


class _Rejected(argparse.Action):
    """A flag the command does not use: a usage error that says why (instead of an unknown-flag error)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if self.const is None:  # a training key
            parser.error(f"{option_string} {values}: a training key, which `{parser.prog}` does not use; set it for "
                         "`starflow train` (or in the training config)")
        parser.error(f"{option_string} {values}: `{parser.prog}` does not use this key ({self.const}); drop it")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def at_least(low: int):
    """An argparse ``type``: an integer ``>= low`` (else the usage error ``--flag: must be >= low``)."""
    def parse(text: str) -> int:
        value = int(text)  # not an integer: argparse reports "invalid integer >= low value"
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def add_config_flags(parser: argparse.ArgumentParser, skip: set[str] = frozenset(),
                     reject: Mapping[str, str | None] | None = None) -> None:
    """One ``--KEY V`` flag per config key (but ``skip``), documented with the key's help and default.

    Keys in ``reject`` (e.g. :data:`SAMPLING_REJECT`) are hidden flags that end the parse with a usage error naming
    the key as one the command does not use, and why (None: a training key).
    """
    reject = reject or {}
    title = ("config overrides (the YAML config's keys this command uses; CLI > YAML > defaults; the defaults shown "
             "are the package's: a config, e.g. a model folder's config.yaml, sets its own, such as cfg)"
             if reject else "config overrides (any key of the YAML config; CLI > YAML > defaults)")
    group = parser.add_argument_group(title)
    defaults = Config()  # the values a key takes when no config sets it (after Config's own fill-ins)
    for name in CONFIG_FIELDS:
        if name in skip:
            continue
        if name in reject:
            group.add_argument(f"--{name}", action=_Rejected, const=reject[name], default=None, help=argparse.SUPPRESS)
            continue
        group.add_argument(f"--{name}", default=None, metavar="V",
                           help=f"{config_field_help(name)} [default: {_shown(getattr(defaults, name))}]")


def _shown(value: object) -> str:
    """A default as the command line would write it: lists space-separated (``layers_per_block 8``)."""
    return " ".join(str(v) for v in value) if isinstance(value, list) else str(value)


def config_overrides(args: argparse.Namespace, skip: set[str] = frozenset()) -> dict:
    """The config keys given on the command line, as ``{key: raw value}`` for :func:`starflow.config.load_config`."""
    return {k: getattr(args, k) for k in CONFIG_FIELDS if k not in skip and getattr(args, k, None) is not None}


def add_weights_io_flags(p: argparse.ArgumentParser, src_help: str, dst_help: str) -> None:
    """SRC, DST, --dtype and --overwrite of the commands that write weights."""
    p.add_argument("src", help=src_help)
    p.add_argument("dst", help=dst_help)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast floating tensors [default: keep]")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")


def add_device_flag(p: argparse.ArgumentParser, help: str = "cpu, cuda, cuda:1 ... [default: cuda if available]") -> None:
    """``--device``."""
    p.add_argument("--device", default=None, help=help)


def check_input_files(args: argparse.Namespace, *flags: str) -> None:
    """Before any work: every given ``--FLAG PATH`` of ``flags`` names an existing file.

    Raises:
        FileNotFoundError: ``--FLAG PATH: no such file`` (a folder, a pipe or a missing path).
    """
    for flag in flags:
        value = getattr(args, flag, None)
        if value and not Path(value).is_file():
            if Path(value).is_dir():
                what = "is a folder, not a file"
            elif Path(value).exists():  # a pipe (<(...), /dev/stdin) or a device: read once, and commands read twice
                what = "is not a regular file (a pipe or a device, which can be read only once)"
            else:
                what = "no such file"
            raise FileNotFoundError(f"--{flag} {value}: {what}; pass the path of an existing file")


def read_text_lines(flag: str, path: str | Path) -> list[str]:
    """The lines of the text file a ``--FLAG PATH`` names (prompts, edits): UTF-8, a leading byte-order mark dropped
    (Windows editors write one), any line ending.

    Raises:
        FileNotFoundError: ``--FLAG PATH`` is missing or a folder.
        ValueError: the file is not UTF-8 text (the byte and its line are named).
        OSError: the file cannot be read (named by its flag).
    """
    check_input_files(argparse.Namespace(**{flag: str(path)}), flag)
    with about_flag(flag, path):
        data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        bad = e.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line = data[:bad].count(b"\n") + 1
        raise ValueError(f"--{flag} {path}: not UTF-8 text (byte 0x{data[bad]:02x} on line {line}); save the file "
                         "as UTF-8") from None
    return text.splitlines()


_NOTED: set[str] = set()


def is_rank0() -> bool:
    """Whether this process is rank 0 of a torchrun launch (or not launched by torchrun): the one that prints notes."""
    return os.environ.get("RANK", "0") == "0"


def note_once(message: str) -> None:
    """Print ``message`` on stderr once per command (:func:`forget_notes`), on rank 0 only (the checks that make notes
    run again before the work, and on every rank)."""
    if message not in _NOTED and is_rank0():
        _NOTED.add(message)
        print(message, file=sys.stderr)


def forget_notes() -> None:
    """Let :func:`note_once` say its notes again (a new command begins)."""
    _NOTED.clear()


def check_output_path(value: str, flag: str = "output_dir") -> Path:
    """Refuse an output folder that could not be created because it, or a folder above it, is a file (checked
    without creating anything, as a ``--dry_run`` does).

    Raises:
        ValueError: ``--FLAG VALUE: ... is a file``.
    """
    out = Path(value)
    blocker = next((p for p in (out, *out.parents) if p.exists()), None)  # the first part of the path that exists
    if blocker is not None and not blocker.is_dir():
        raise ValueError(f"--{flag} {out}: " + ("" if blocker == out else f"{blocker} ") + "is a file; pass a folder")
    check_writable(out, f"--{flag}")
    return out


def output_folder(value: str, flag: str = "output_dir") -> tuple[Path, dict[str, int]]:
    """Create the folder a command writes (called once every input has been read and checked, so a refused command
    writes nothing); returns it with its :func:`~starflow.sampling.io.folder_state` from before, for
    :func:`~starflow.sampling.io.note_earlier_files`.

    Raises:
        OSError: ``--FLAG VALUE: cannot create it``.
    """
    from starflow.sampling.io import folder_state

    out = Path(value)
    before = folder_state(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"--{flag} {out}: cannot create it ({e.strerror}); pass a writable folder") from None
    check_writable(out, f"--{flag}")  # a file written now, not after the work
    return out, before


@contextmanager
def about_flag(flag: str, value) -> Iterator[None]:
    """Prefix a ``ValueError``/``OSError`` raised inside with ``--FLAG VALUE: `` (unless it already names the flag), so
    a failure reading a flag's input says which flag it came from."""
    try:
        yield
    except (ValueError, OSError) as e:
        message = str(e)
        if message.startswith(f"--{flag}"):
            raise
        prefix = f"--{flag}" if str(value) in message else f"--{flag} {value}"  # (the path once, not twice)
        try:
            wrapped = type(e)(f"{prefix}: {message}")
        except TypeError:  # an exception type with another constructor
            wrapped = ValueError(f"{prefix}: {message}")
        raise wrapped from None


def say_error(line: str) -> None:
    """Print a command's error line, once: under torchrun rank 0 prints it, and every rank records its own in the error
    file torchrun reads (``TORCHELASTIC_ERROR_FILE``), so the launcher's failure summary names the first rank that
    failed and why, also when only another rank met the error."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        record = {"message": {"message": line, "extraInfo": {"timestamp": str(int(time.time()))}}}
        try:
            Path(path).write_text(json.dumps(record))
        except OSError:
            path = None
    if is_rank0() or not path:
        print(line, file=sys.stderr)
