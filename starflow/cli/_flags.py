"""Flags shared by several commands: every config key as a flag, the weights-writing flags, ``--device``."""
from __future__ import annotations

import argparse
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from starflow.config import CONFIG_FIELDS, config_field_help

SAMPLING_SKIP = frozenset({"data", "ema", "ema_start", "init_from", "compile"})
"""Config keys the sampling commands do not take as flags: training-only keys, and --ema / --compile, which are
switches of their own there."""

__all__ = ["SAMPLING_SKIP", "add_config_flags", "config_overrides", "add_weights_io_flags", "add_device_flag", "DTYPES",
           "check_input_files", "about_flag"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_config_flags(parser: argparse.ArgumentParser, skip: set[str] = frozenset()) -> None:
    """One ``--KEY V`` flag per config key (but ``skip``), documented with the key's help and default."""
    group = parser.add_argument_group("config overrides (any key of the YAML config; CLI > YAML > defaults)")
    for name, f in CONFIG_FIELDS.items():
        if name in skip:
            continue
        group.add_argument(f"--{name}", default=None, metavar="V",
                           help=f"{config_field_help(name)} [default: {f.default}]")


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
        FileNotFoundError: ``--FLAG PATH: no such file`` (a folder or a missing path).
    """
    for flag in flags:
        value = getattr(args, flag, None)
        if value and not Path(value).is_file():
            what = "is a folder, not a file" if Path(value).is_dir() else "no such file"
            raise FileNotFoundError(f"--{flag} {value}: {what}; pass the path of an existing file")


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
        try:
            wrapped = type(e)(f"--{flag} {value}: {message}")
        except TypeError:  # an exception type with another constructor
            wrapped = ValueError(f"--{flag} {value}: {message}")
        raise wrapped from None
