"""``starflow export``: one consolidated weights file (or model folder) from a sharded training checkpoint.

The DCP checkpoint of a run (see :mod:`starflow.train.state`) holds the model in shards, one file per rank,
next to the optimizer state. Export reads only the model's tensors, in one process and without a process
group (DCP reshards on load), and writes them in the official layout (the names of ``keys_*.json``) as
``.pth`` or ``.safetensors``, or as a model folder that ``starflow sample --checkpoint_path`` reads.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from starflow.adapters import build_text_encoder, vae_geometry
from starflow.assets import TINY_TEXT_ENCODER
from starflow.checkpoint import save_weights
from starflow.config import Config, load_config
from starflow.models import STARFlow
from starflow.sampling.pipeline import Pipeline
from starflow.train.state import META_FILE, CheckpointManager

__all__ = ["find_checkpoint", "load_checkpoint_model", "export_checkpoint"]


def find_checkpoint(src: str | Path) -> Path:
    """The checkpoint folder meant by ``src``: a run's logdir or its ``checkpoints/`` (the latest) or one
    ``step_XXXXXXXX`` folder.

    Raises:
        FileNotFoundError: no complete checkpoint there (the message says what was looked for).
    """
    src = Path(src)
    if (src / META_FILE).is_file():
        return src
    for folder in (src / "checkpoints", src):
        latest = CheckpointManager(folder).latest()
        if latest is not None:
            return latest
    raise FileNotFoundError(f"no training checkpoint in {src}: expected a run's logdir, its checkpoints/ folder or "
                            f"a step_XXXXXXXX folder with {META_FILE} (written by starflow train)")


def load_checkpoint_model(path: str | Path, ema: bool = False) -> tuple[Config, torch.nn.Module]:
    """Build the run's STARFlow from the checkpoint's config and load its (unsharded) weights on CPU.

    Args:
        path: see :func:`find_checkpoint`.
        ema: load the moving average of the weights (config ``ema``) instead of the weights.

    Returns:
        ``(config, model)``.

    Raises:
        FileNotFoundError: see :func:`find_checkpoint`; ValueError: ``ema`` for a run without an EMA;
        RuntimeError: unreadable checkpoint.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    path = find_checkpoint(path)
    cfg = load_config(json.loads((path / META_FILE).read_text())["config"])
    shapes = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    txt = [m.size for k, m in shapes.items() if k.startswith("model.") and k.endswith("proj_txt.weight")]
    with torch.device("meta"):
        model = STARFlow.from_config(cfg, txt_dim=txt[0][1] if txt else None,
                                     vae_downsample=vae_geometry(cfg.vae).downsample)
    model.to_empty(device="cpu")
    if ema and not any(k.startswith("ema.") for k in shapes):
        raise ValueError(f"{path} holds no EMA weights (train with config key 'ema', e.g. --ema 0.9999)")
    state = {"ema": {k: p.detach() for k, p in model.named_parameters()}} if ema else {"model": model.state_dict()}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(path))
    except Exception as e:
        raise RuntimeError(f"cannot read the model from {path} ({type(e).__name__}: {e})") from e
    if not ema:  # the EMA entries were loaded into the parameters in place
        model.load_state_dict(state["model"])
    return cfg, model.eval()


def export_checkpoint(src: str | Path, dst: str | Path, dtype: torch.dtype | None = None, ema: bool = False) -> Path:
    """Write the model of a training checkpoint as ``dst``.

    Args:
        src: logdir, ``checkpoints/`` folder or step folder (see :func:`find_checkpoint`).
        dst: ``*.pth`` / ``*.safetensors`` file (weights only), or a folder (``config.yaml``,
            ``model.safetensors`` and, for the built-in tiny text encoder, ``text_encoder/``).
        dtype: optional floating-point dtype of the written tensors (e.g. ``torch.bfloat16``).
        ema: write the moving average of the weights (config ``ema``) instead of the weights.

    Returns:
        ``dst``.
    """
    cfg, model = load_checkpoint_model(src, ema=ema)
    if dtype is not None:
        model.to(dtype)
    dst = Path(dst)
    if dst.suffix in (".pth", ".pt", ".safetensors"):
        dst.parent.mkdir(parents=True, exist_ok=True)
        return save_weights(model, dst)
    text_encoder = build_text_encoder(cfg, device="cpu") if cfg.text == TINY_TEXT_ENCODER else None
    Pipeline(model, text_encoder, None, cfg).save_pretrained(dst)
    return dst
