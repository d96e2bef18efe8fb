"""``starflow export``: one consolidated weights file (or model folder) from a sharded training checkpoint.

The DCP checkpoint of a run (see :mod:`starflow.train.state`) holds the model in shards, one file per rank,
next to the optimizer state. Export reads only the model's tensors, in one process and without a process
group (DCP reshards on load), and writes them in the official layout (the names of ``keys_*.json``) as
``.pth`` or ``.safetensors``, or as a model folder that ``starflow sample --checkpoint_path`` reads.
"""
from __future__ import annotations

from pathlib import Path

import torch

from starflow.adapters import LabelEncoder, TextEncoder, build_text_encoder, vae_geometry
from starflow.adapters.labels import is_vocab
from starflow.assets import TINY_TEXT_ENCODER, resolve_asset
from starflow.checkpoint import WEIGHT_SUFFIXES, save_weights
from starflow.config import Config, load_config
from starflow.models import STARFlow
from starflow.sampling.pipeline import Pipeline
from starflow.sizing import text_width
from starflow.train.init_from import check_base, init_from
from starflow.models.lora import LORA_MARK, apply_lora, merge_lora_state
from starflow.train.state import META_FILE, CheckpointManager, dcp_metadata, read_dcp, read_meta

__all__ = ["find_checkpoint", "load_checkpoint_model", "export_checkpoint"]

_FILE_LIKE = frozenset({".bin", ".ckpt", ".safetensor", ".pkl", ".pt", ".pth", ".safetensors", ".tar", ".gguf",
                        ".onnx", ".h5", ".npz", ".st"})  # names meant as a file, refused when not one we write


def find_checkpoint(src: str | Path) -> Path:
    """The checkpoint folder meant by ``src``: a run's logdir or its ``checkpoints/`` (the latest) or one
    ``step_XXXXXXXX`` folder.

    Raises:
        FileNotFoundError: no complete checkpoint there (the message says what was looked for).
    """
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist: pass a run's logdir (starflow train --logdir), its "
                                "checkpoints/ folder or a step_XXXXXXXX folder")
    if (src / META_FILE).is_file():
        return src
    for folder in (src / "checkpoints", src):
        latest = CheckpointManager(folder).latest()
        if latest is not None:
            return latest
    raise FileNotFoundError(f"no training checkpoint in {src}: expected a run's logdir, its checkpoints/ folder or "
                            f"a step_XXXXXXXX folder with {META_FILE} (written by starflow train)")


def _merged_lora_model(cfg: Config, path: Path) -> STARFlow:
    """The base weights (``init_from``) with the checkpoint's LoRA adapters folded in, as a plain STARFlow.

    Raises:
        ValueError: no ``init_from``, or base weights other than those the adapters were trained over.
    """
    if not cfg.init_from:
        raise ValueError(f"{path} holds LoRA adapters but its config has no 'init_from' (the base weights)")
    check_base(read_meta(path).get("lora_base"), cfg.init_from, f"merging {path}")
    model = STARFlow.from_config(cfg, txt_dim=text_width(cfg), vae_downsample=vae_geometry(cfg.vae).downsample)
    init_from(model, cfg.init_from)
    apply_lora(model, cfg)
    state = {"model": {k: v for k, v in model.state_dict().items() if LORA_MARK in k}}
    read_dcp(state, path)
    model.load_state_dict(state["model"], strict=False)
    plain = STARFlow.from_config(cfg, txt_dim=text_width(cfg), vae_downsample=vae_geometry(cfg.vae).downsample)
    plain.load_state_dict(merge_lora_state(model.state_dict(), cfg))
    return plain


def load_checkpoint_model(path: str | Path, ema: bool = False,
                          merge_lora: bool = False) -> tuple[Config, torch.nn.Module]:
    """Build the run's STARFlow from the checkpoint's config and load its (unsharded) weights on CPU.

    Args:
        path: see :func:`find_checkpoint`.
        ema: load the moving average of the weights (config ``ema``) instead of the weights.
        merge_lora: a LoRA run (``lora_rank``): fold its adapters into the base weights (``init_from``).

    Returns:
        ``(config, model)``: a plain STARFlow in the official layout.

    Raises:
        FileNotFoundError: see :func:`find_checkpoint`; ValueError: ``ema`` for a run without an EMA (a LoRA run
        among them), a LoRA checkpoint without ``merge_lora`` or the reverse; RuntimeError: unreadable checkpoint.
    """
    path = find_checkpoint(path)
    cfg = load_config(read_meta(path, ("step", "config"))["config"])
    if bool(cfg.lora_rank) != merge_lora:
        raise ValueError(f"{path} holds LoRA adapters: pass --merge_lora to fold them into the base weights"
                         if cfg.lora_rank else f"{path} is not a LoRA run (lora_rank 0): drop --merge_lora")
    if merge_lora:
        if ema:
            raise ValueError(f"{path} is a LoRA run, which keeps no EMA weights: drop --ema")
        return cfg, _merged_lora_model(cfg, path).eval()
    shapes = dcp_metadata(path)
    txt = [m.size for k, m in shapes.items() if k.startswith("model.") and k.endswith("proj_txt.weight")]
    with torch.device("meta"):
        model = STARFlow.from_config(cfg, txt_dim=txt[0][1] if txt else None,
                                     vae_downsample=vae_geometry(cfg.vae).downsample)
    model.to_empty(device="cpu")
    if ema and not any(k.startswith("ema.") for k in shapes):
        raise ValueError(f"{path} holds no EMA weights (train with config key 'ema', e.g. --ema 0.9999)")
    state = {"ema": {k: p.detach() for k, p in model.named_parameters()}} if ema else {"model": model.state_dict()}
    read_dcp(state, path)
    if not ema:  # the EMA entries were loaded into the parameters in place
        model.load_state_dict(state["model"])
    return cfg, model.eval()


def export_checkpoint(src: str | Path, dst: str | Path, dtype: torch.dtype | None = None, ema: bool = False,
                      merge_lora: bool = False) -> Path:
    """Write the model of a training checkpoint as ``dst``.

    Args:
        src: logdir, ``checkpoints/`` folder or step folder (see :func:`find_checkpoint`).
        dst: ``*.pth`` / ``*.pt`` / ``*.bin`` / ``*.safetensors`` file (weights only), or a folder (``config.yaml``,
            ``model.safetensors`` and, for the built-in tiny text encoder, ``text_encoder/``).
        dtype: optional floating-point dtype of the written tensors (e.g. ``torch.bfloat16``).
        ema: write the moving average of the weights (config ``ema``) instead of the weights.
        merge_lora: a LoRA run: write its base weights with the adapters folded in.

    Returns:
        ``dst``.

    Raises:
        ValueError: ``dst`` has the suffix of another kind of weights file (``.ckpt``, ``.PTH``, ...).
    """
    dst = Path(dst)
    if dst.suffix.lower() in _FILE_LIKE and dst.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"{dst}: weights files end in {', '.join(WEIGHT_SUFFIXES)}, and a model folder is written for "
                         f"a name without a suffix: rename it (e.g. {dst.with_suffix('.safetensors')})")
    cfg, model = load_checkpoint_model(src, ema=ema, merge_lora=merge_lora)
    if dtype is not None:
        model.to(dtype)
    if dst.suffix in WEIGHT_SUFFIXES:
        dst.parent.mkdir(parents=True, exist_ok=True)
        return save_weights(model, dst)
    Pipeline(model, run_text_encoder(cfg, find_checkpoint(src).parent.parent), None, cfg).save_pretrained(dst)
    return dst


def run_text_encoder(cfg: Config, logdir: Path):
    """The text encoder a model folder of a run must carry (``Pipeline.save_pretrained`` copies it in): the built-in
    tiny T5, a class vocabulary or a local T5 folder, looked up beside the run (``logdir/model``, ``logdir``) first;
    None for a Hub id (the folder's config names it).

    Raises:
        FileNotFoundError: a class vocabulary found nowhere (the message says where it was looked for).
    """
    if is_vocab(cfg.text or ""):  # as named, or the copy the run keeps in its folder (under its file name)
        for candidate in (resolve_asset(cfg.text, logdir / "model", logdir), logdir / "model" / Path(cfg.text).name,
                          logdir / Path(cfg.text).name):
            if Path(candidate).is_file():
                return LabelEncoder.from_file(candidate)
    if cfg.text == TINY_TEXT_ENCODER or is_vocab(cfg.text or ""):  # (a vocabulary found nowhere: the error says so)
        return build_text_encoder(cfg, logdir / "model", logdir, device="cpu")
    local = resolve_asset(cfg.text, logdir / "model", logdir)
    if local is not None and Path(local).is_dir():
        return TextEncoder.from_pretrained(local, max_length=cfg.txt_size)
    return None
