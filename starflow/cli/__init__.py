"""Command line: starflow {train,sample,inpaint,edit,validate,download,convert,export,eval-nll,generate-set,
evaluate,pack,cache-latents}.

Every config key is also a flag (--img_size 256); precedence is CLI > YAML > defaults, the same for
training and sampling (the sampling commands reject the keys only training reads). `starflow COMMAND --help`
documents each flag with its default and unit.
"""
from __future__ import annotations

import argparse
import os
import select
import signal
import sys
import warnings
from pathlib import Path

from starflow.worker import launched_by_torchrun, stop_with_launcher

if launched_by_torchrun():  # first thing, before the imports below take seconds: a killed launcher stops its workers
    stop_with_launcher()

from starflow.cli import checkpoints, data, edit, evaluate, sample, train
from starflow.cli._flags import OneLineErrors, is_rank0, say_error
from starflow.console import line_start, log_lines
from starflow.signals import sigterm_stops_at_once

__all__ = ["main", "build_parser"]


def build_parser() -> OneLineErrors:
    """The ``starflow`` parser: one subcommand per command, each registered by its module in ``starflow.cli``."""
    parser = OneLineErrors(prog="starflow", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    parser.commands = sub.choices  # main() reports unknown flags through the command's own parser
    train.register(sub)
    sample.register(sub)
    edit.register(sub)  # inpaint, edit
    checkpoints.register(sub)  # validate, download, convert, export
    evaluate.register(sub)  # eval-nll, generate-set, evaluate
    data.register(sub)  # pack, cache-latents
    return parser


_PACKAGE = Path(__file__).resolve().parents[1]
_python_formatwarning = warnings.formatwarning


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """The package's own warnings as one plain line, ``warning: ...`` (they speak to the user: a truncated prompt, a
    slow setting); those of other libraries as Python shows them (file and line, for their authors)."""
    start = line_start()
    if Path(filename).resolve().is_relative_to(_PACKAGE):
        return f"{start}warning: {message}\n"
    return start + _python_formatwarning(message, category, filename, lineno, line)


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader went away (``poll`` sees an error on it); True where that cannot be
    asked (no ``poll``: Windows)."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & (select.POLLERR | select.POLLHUP) for _, event in poll.poll(0))
    except (AttributeError, OSError, ValueError):
        return True


def _end_progress_bars() -> None:
    """Close the progress bars a failed command left open, so that its error starts a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


SINGLE_PROCESS = ("validate", "download", "convert", "export", "evaluate", "pack", "cache-latents", "inpaint", "edit")
"""Commands that run on one process: under torchrun (several processes) they are refused before any work, as every
process would do the whole job and write the same files."""


RESUMES = {"train": "from its last checkpoint", "generate-set": "from the samples already written",  # resumable
           "cache-latents": "from the shards it finished, kept in the output folder's .staging-resume; the cache "
                            "already in the output folder, if any, is unchanged until the new one is complete"}
RESTARTS = {"pack": "the shards already in the output folder, if any, are unchanged"}  # written aside, swapped in whole
PATH_ARGUMENTS = {"output_dir", "out", "data", "checkpoint", "checkpoint_path", "config", "model_config_path",
                  "input_image", "input_video", "last_image", "mask", "local_dir", "src", "dst", "samples", "reference",
                  "save_stats", "caption_file"}
"""Arguments that name a file or folder: an empty one is refused."""


def _did_you_mean(command: argparse.ArgumentParser, unknown: list[str]) -> str:
    """`` (did you mean --caption?)`` for a mistyped flag among ``unknown`` close to one of ``command``'s, else ``""``."""
    import difflib

    flags = [s for action in command._actions for s in action.option_strings if s.startswith("--")]
    for arg in unknown:
        if arg.startswith("--"):
            close = difflib.get_close_matches(arg.split("=")[0], flags, n=1, cutoff=0.75)
            if close:
                return f" (did you mean {close[0]}?)"
    return ""


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the command; bad input ends as ``error: ...`` on stderr with exit code 2
    (``STARFLOW_DEBUG=1`` re-raises instead). The package's log records show as ``warning: ...`` lines meanwhile
    (:func:`starflow.console.log_lines`)."""
    with log_lines():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    from starflow.checkpoint import CheckpointError
    from starflow.cli._flags import forget_notes

    forget_notes()  # each command says its notes once (several may run in one process, e.g. from Python)
    warnings.formatwarning = _format_warning
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the subcommand's parser, which names the command
        command = parser.commands[args.command]
        command.error(f"unrecognized arguments: {' '.join(unknown)}" + _did_you_mean(command, unknown))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.command in SINGLE_PROCESS and world > 1:
        say_error(f"error: starflow {args.command} runs on one process, and {world} were started (torchrun): start "
                   "it without torchrun")
        return 2
    command = parser.commands[args.command]
    for action in command._actions:  # ("" is the current folder to pathlib: files would land among the user's own)
        value = getattr(args, action.dest, None)
        if action.dest in PATH_ARGUMENTS and isinstance(value, str) and not value.strip():
            shown = action.option_strings[0] if action.option_strings else action.dest.upper()
            command.error(f"{shown} {value!r}: an empty path; name the file or folder")
    for key, value in vars(args).items():  # --out=~/x: the shell expands no ~ after '='
        if isinstance(value, str) and value.startswith("~/") and key not in ("caption", "source_caption",
                                                                              "negative_prompt"):
            setattr(args, key, os.path.expanduser(value))
    try:
        with sigterm_stops_at_once():
            return args.func(args)
    except SystemExit as e:  # a command's own stop: a message is bad input, a number an exit status
        _end_progress_bars()
        if isinstance(e.code, str):
            say_error(f"error: {e.code}")
            return 2
        raise
    except BrokenPipeError as e:
        if _stdout_reader_gone():  # (`starflow validate ... | head`): nothing to say
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (no second error when Python flushes)
            return 141
        if os.environ.get("STARFLOW_DEBUG"):
            raise
        _end_progress_bars()  # another pipe (a DataLoader worker's, say): an error like any other
        say_error(f"error: {e}")
        return 2
    except (ValueError, OSError, CheckpointError, RuntimeError, KeyError, ImportError) as e:  # (a missing package)
        if os.environ.get("STARFLOW_DEBUG"):
            raise
        _end_progress_bars()
        say_error(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}")
        return 2
    except KeyboardInterrupt as e:
        _end_progress_bars()
        resume = RESUMES.get(args.command)
        what = str(e) or "interrupted"  # (training stopped on a signal says at which step, checkpoint written)
        if resume:
            what += f": rerun the same command to resume ({resume})"
        elif args.command in RESTARTS:
            what += f": nothing half-written is kept, and {RESTARTS[args.command]}; rerun the same command to start again"
        if is_rank0():  # (under torchrun every rank stops: one says so)
            print(what, file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)
    except Exception as e:  # noqa: BLE001 - anything else is a bug: say so in one line, keep the traceback one env var away
        if os.environ.get("STARFLOW_DEBUG"):
            raise
        _end_progress_bars()
        say_error(f"error: unexpected {type(e).__name__}: {e} (a bug: rerun with STARFLOW_DEBUG=1 for the traceback "
                   "and report it)")
        return 1
