"""Finding pretrained models (text encoder, VAE) locally or on the Hugging Face Hub.

Both adapters resolve a ``name_or_path`` the same way: an existing local folder first, then the
Hugging Face cache, then the Hub (``transformers``/``diffusers`` do the last two). This module holds
the one place that decides whether the Hub may be contacted and the one error users see when a
model is missing.
"""

from __future__ import annotations

import os
import socket

import huggingface_hub.constants

from starflow.checkpoint import damage_reason, refused_global

_TRUE_VALUES = frozenset({"1", "true", "yes", "on"})


def hub_offline() -> bool:
    """Whether the Hugging Face Hub must not be contacted.

    ``huggingface_hub`` reads ``HF_HUB_OFFLINE`` once, at import; this function also reads the
    environment at call time, so setting the variable later (in a test, a notebook) still takes effect.

    Returns:
        True if ``HF_HUB_OFFLINE`` is set to a true value now or was when ``huggingface_hub`` was imported.
    """
    now = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE_VALUES
    return now or bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def resolve_local_files_only(local_files_only: bool | None) -> bool:
    """Turn the user's ``local_files_only`` choice into a bool.

    Args:
        local_files_only: True: local folder or HF cache only; False: the Hub may be contacted;
            None: decide from ``HF_HUB_OFFLINE`` (see :func:`hub_offline`).

    Returns:
        Whether to load from local files only.
    """
    return hub_offline() if local_files_only is None else local_files_only


def looks_like_local_path(name_or_path: str) -> bool:
    """Whether ``name_or_path`` can only be a filesystem path, not a Hub id (``org/name``).

    Args:
        name_or_path: A Hub id such as ``google/flan-t5-xl`` or a folder.

    Returns:
        True for existing folders, absolute paths, paths starting with ``.`` or ``~``, and paths with
        more than one separator.
    """
    return (
        os.path.isdir(name_or_path)
        or os.path.isabs(name_or_path)
        or name_or_path.startswith((".", "~"))
        or name_or_path.count("/") > 1
        or "\\" in name_or_path
    )


def weights_error(name_or_path: str, what: str, cause: BaseException) -> ValueError:
    """The error of a model whose weights file could not be read: a pickled one (``pytorch_model.bin``) that torch's
    weights-only loading refused naming a global holds more than tensors (unpickling it could run code); any other
    (a truncated ``.safetensors``, garbage) is damaged."""
    named = refused_global(cause)
    if named:
        return ValueError(f"the {what} {name_or_path!r} has a weights file holding Python objects besides tensors (it "
                          f"names {named}), which loading could run as code: use its .safetensors weights, "
                          "or a copy from a source you trust")
    return ValueError(f"the {what} {name_or_path!r} has a damaged weights file ({damage_reason(cause)}): download it "
                      "again")


def missing_model_error(name_or_path: str, what: str, *, subfolder: str | None = None,
                        cause: BaseException | None = None) -> FileNotFoundError:
    """Build the error raised when a pretrained model cannot be found.

    Args:
        name_or_path: The Hub id or folder that was asked for.
        what: What the model is for, e.g. ``"T5 text encoder"`` or ``"SD-VAE"``.
        subfolder: Subfolder inside the repo or folder, if any.
        cause: The underlying loader error; its message is appended.

    Returns:
        A ``FileNotFoundError`` (an ``OSError``) whose message names the model and says how to get it.
    """
    where = f"{name_or_path} (subfolder {subfolder!r})" if subfolder else name_or_path
    if looks_like_local_path(name_or_path):
        how = (f"No usable folder at {os.path.abspath(name_or_path)!r}: it must hold "
               "the files written by `save_pretrained` (config.json, weights, tokenizer files).")
    else:
        local_dir = os.path.join("ckpts", name_or_path.rstrip("/"))
        how = (f"The released models' T5 and VAEs come with `starflow download t2i|t2v --local-dir ckpts`; any Hub "
               f"model with `hf download {name_or_path} --local-dir {local_dir}`. A folder named like the id under "
               "./ckpts, the config's folder or the weights' folder is found without changing the config. "
               "With HF_HUB_OFFLINE=1 only local folders and the Hugging Face cache are searched; "
               "the network is never contacted.")
    message = f"Could not load the {what} {where!r}. {how}"
    if cause is not None:
        message += f"\nUnderlying error: {type(cause).__name__}: {cause}"
        network = network_failure(cause)
        if network is not None:
            message += (f"\nThe Hugging Face Hub could not be reached ({type(network).__name__}: {network}): the "
                        "model is not in the local cache and there is no network. Set HF_HUB_OFFLINE=1 to skip the "
                        "connection attempts.")
    return FileNotFoundError(message)


def network_failure(error: BaseException) -> BaseException | None:
    """The connection error behind a loader error, if a failed connection caused it.

    ``transformers``/``diffusers`` report an unreachable Hub as a missing file ("does not appear to have a file
    named config.json"); the cause is further down the exception chain (``__cause__``/``__context__``).

    Args:
        error: the loader's exception.

    Returns:
        The first connection error in the chain (a ``ConnectionError``, ``socket.gaierror``, or an HTTP client's
        ``ConnectError``/``ConnectTimeout``), or None.
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        name = type(error).__name__
        if isinstance(error, (ConnectionError, socket.gaierror)) or name in ("ConnectError", "ConnectTimeout"):
            return error
        error = error.__cause__ or error.__context__
    return None


def check_local_folder(name_or_path: str, what: str, *, subfolder: str | None = None) -> None:
    """Fail early, with the helpful message, when a local path holds no saved model.

    Hub ids pass through untouched (the loaders search the cache and the Hub).

    Args:
        name_or_path: Hub id or folder.
        what: What the model is for, for the message.
        subfolder: Subfolder holding ``config.json``, if any.

    Raises:
        FileNotFoundError: ``name_or_path`` is a path without ``[subfolder/]config.json``.
    """
    config_file = os.path.join(name_or_path, subfolder or "", "config.json")
    if looks_like_local_path(name_or_path) and not os.path.isfile(config_file):
        raise missing_model_error(name_or_path, what, subfolder=subfolder)
