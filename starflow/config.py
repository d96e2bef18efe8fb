"""Typed configuration in the official STARFlow YAML format.

The official configs (``configs/starflow_3B_t2i_256x256.yaml``, ``configs/starflow-v_7B_t2v_caus_480p.yaml``)
are YAML files with a top-level ``arguments:`` list of one-key maps. :func:`load_config` reads those,
plain mappings, or dicts, and normalises once: ``0/1`` to ``bool``, ``"2 2 2 2 2 24"`` to ``list[int]``,
``"81:16"`` to ``(frames, fps)``, ``"none"`` to ``None``. Unknown keys and contradictions raise
``ValueError`` naming the key (and the nearest valid key for typos).

Precedence is CLI > YAML > defaults, for training and sampling alike (:func:`apply_overrides`).
Defaults are those of the official parser (STARFlow, arXiv 2506.06276; SPEC section 1).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

__all__ = ["Config", "CONFIG_FIELDS", "TRAINING_KEYS", "load_config", "save_config", "apply_overrides", "config_field_help",
           "inactive_keys", "check_inactive"]


def _f(default: Any, doc: str, training: bool = False) -> Any:
    """A config field with its one-line ``doc``; ``training=True`` marks a key only training reads (optimizer,
    schedule, data, logging, training arithmetic), which the sampling commands refuse as a flag."""
    return field(default=default, metadata={"doc": doc, "training": training})


@dataclass
class Config:
    """Every key of the official YAML configs, plus the training and sampling knobs of this package.

    Field names are the official keys; units are in each field's ``doc`` metadata
    (``starflow train --help`` prints them).
    """

    # --- model shape -----------------------------------------------------------------------
    channel_size: int = _f(3, "channels of the flow's input (latent channels with a VAE, else pixel channels)")
    img_size: int = _f(32, "image side in pixels (latent side = img_size // vae downsample)")
    patch_size: int = _f(4, "patch side in latent cells; token width D = patch_size**2 * channel_size")
    channels: int = _f(512, "transformer width W of the shallow blocks (and the denoiser)")
    top_block_channels: int | None = _f(None, "width of the deep block (None = channels)")
    blocks: int = _f(4, "number of flow blocks when layers_per_block has a single entry")
    layers_per_block: list[int] = _f(None, "transformer layers per flow block, e.g. '2 2 2 2 2 24' (last = deep block)")
    head_dim: int = _f(64, "attention head width; heads = width // head_dim")
    rope: bool = _f(False, "rotary position embedding on queries and keys")
    pt_seq_len: int | None = _f(None, "RoPE position scale P (None = latent side // patch_size)")
    sos: bool = _f(False, "prepend a learned start-of-sequence token in every block")
    seq_order: str = _f("R2L", "official order switch: 'R2L' = block 0 reads tokens in raster order, 'L2R' = block 0 "
                                 "reads them flipped; the blocks then alternate (SPEC section 5)")
    use_softplus: bool = _f(False, "scale a = softplus(o + 0.5413) instead of exp(o)")
    cond_top_only: bool = _f(False, "condition only the deep block on text")
    use_final_norm: bool = _f(False, "RMSNorm (float32, 1 + weight) before proj_out")
    soft_clip: float = _f(0.0, "soft clipping s*tanh(o/s) of the block outputs (0 = off)")
    txt_size: int = _f(0, "text tokens L (prompts are padded/truncated to it); 0 = unconditional")
    learnable_self_denoiser: bool = _f(False, "train/use the learnable non-causal denoiser (STARFlow-V)")
    conditional_denoiser: bool = _f(False, "the learnable denoiser sees the text")
    denoiser_window: int | None = _f(None, "denoiser attention window G in latent frames")
    temporal_causal: int = _f(0, "video: block-causal frame span A (flip reverses tokens inside each frame)")
    shallow_block_local: bool = _f(False, "video: shallow blocks see each frame on its own")
    local_attn_window: int | None = _f(None, "local attention window (not used by the released models)")
    noise_std: float = _f(0.3, "std of the Gaussian noise added to training latents (normalised-latent units)")
    cond_noise_level: bool = _f(False, "prefix the prompt with the noise level (SPEC section 12)")
    fps_cond: bool = _f(False, "prefix the prompt with the fps / 'An image:' (SPEC section 12)")
    mix_aspect: bool = _f(False, "train on aspect-ratio buckets and state the ratio in the prompt")
    vid_size: tuple[int, ...] | None = _f(None, "video 'frames:fps', e.g. '81:16', or 'frames:fps1:fps2:...' (a rate "
                                                "drawn per training clip; sampling uses the first) (None = images)")
    # --- conditioning, encoders -------------------------------------------------------------
    text: str | None = _f(None, "text encoder: hub id or folder (e.g. google/flan-t5-xl), 'tiny-t5', or a .vocab file "
                                "of class names (class-conditional, txt_size 1)")
    vae: str | None = _f(None, "VAE: hub id or folder, optional ':scale' suffix for video (None = pixels)")
    finetuned_vae: str | None = _f(None, "fine-tuned VAE decoder weights; only none (the VAE's own decoder) is "
                                         "supported")
    cfg: float = _f(0.0, "classifier-free guidance weight w used when sampling")
    temperature: float = _f(1.0, "sampling temperature: the Gaussian noise the flow inverts is scaled by it (Glow, "
                             "Kingma & Dhariwal 2018); 1 = the official sampling")
    drop_label: float = _f(0.0, "probability of replacing the caption by '' in training", training=True)
    drop_image: float = _f(0.0, "video: probability of dropping the first frame in training", training=True)
    video_to_video: bool = _f(False, "video: clips hold target then source frames; train source -> target with the "
                                     "'(v2v) ' caption tag")
    last_frame_cond: bool = _f(False, "video: condition on the clip's end frame (one latent frame before the clip, "
                                      "'(last) ' caption tag)")
    noise_type: str = _f("gaussian", "training noise: 'gaussian' (x + noise_std * N(0, I)) or 'uniform' "
                                     "(dequantisation of 8-bit pixels; pixel models only)", training=True)
    # --- optimisation -----------------------------------------------------------------------
    lr: float = _f(1e-4, "peak learning rate", training=True)
    min_lr: float = _f(1e-6, "final learning rate of the cosine schedule", training=True)
    weight_decay: float = _f(1e-4, "AdamW weight decay", training=True)
    warmup_steps: int = _f(1000, "linear warm-up steps", training=True)
    steps: int = _f(100000, "total optimizer steps", training=True)
    batch_size: int = _f(64, "global batch size (split across ranks)", training=True)
    grad_accum: int = _f(1, "gradient accumulation micro-steps per optimizer step", training=True)
    grad_clip: float = _f(0.0, "clip the gradient norm to this value (0 = off)", training=True)
    grad_skip: bool = _f(False, "skip updates whose gradient norm (the flow's or the learned denoiser's) exceeds "
                         "grad_clip after step 100", training=True)
    max_nonfinite: int = _f(20, "stop after this many consecutive non-finite steps (no checkpoint is written while "
                                "they last: a rerun resumes from the one before them); 0 never stops", training=True)
    latent_norm_regularization: float = _f(0.0, "lambda of the intermediate latent norm penalty", training=True)
    lora_rank: int = _f(0, "LoRA rank r: train only low-rank adapters of the lora_targets layers (0 = all weights)")
    lora_alpha: float = _f(16.0, "LoRA scale alpha: the adapters add (alpha / r) B A x")
    lora_targets: str | None = _f(None, "LoRA target layers, a regex over module names (None = the deep block's "
                                        "attention qkv/proj and MLP main.0/main.2)")
    ema: float = _f(0.0, "decay of the exponential moving average of the weights, e.g. 0.9999 (0 = no EMA)")
    ema_start: int = _f(0, "optimizer steps during which the EMA just copies the weights", training=True)
    denoiser_lr: float = _f(1e-4, "peak learning rate of the learnable self-denoiser's own AdamW (its own cosine "
                                  "schedule to 1e-6 over the run)", training=True)
    loss_scaling: bool = _f(False, "official flag: fp16 dynamic loss scaling; training here runs in bf16 or fp32, "
                                   "which need none, so `starflow train` rejects 1", training=True)
    seed: int = _f(0, "random seed")
    # --- systems ----------------------------------------------------------------------------
    fsdp: bool = _f(False, "shard the model with FSDP2 under torchrun")
    fsdp_text_encoder: bool = _f(False, "shard the frozen text encoder with FSDP2 too", training=True)
    gradient_checkpoint: int = _f(0, "activation checkpointing of attention in every k-th transformer layer "
                                     "(0 = off, 1 = every layer)", training=True)
    gradient_checkpoint_mlp: int | None = _f(None, "activation checkpointing of the MLP in every k-th transformer "
                                                  "layer (0 = off, 1 = every layer; none = as gradient_checkpoint, "
                                                  "the official default)", training=True)
    precision: str = _f("auto", "training arithmetic: bf16 (autocast, the official recipe; FSDP2 computes with bf16 "
                                "copies of its float32 parameters and reduces gradients in fp32; a sharded T5 runs in "
                                "bf16 too), fp32, or auto = bf16 on CUDA and fp32 on CPU. On a CPU with native bf16 "
                                "(AVX512-BF16 or AMX) bf16 is the faster one (benchmarks/train_step.py --precision "
                                "fp32,bf16); the flow's scale, shift and log-determinant stay float32", training=True)
    malloc_retain: bool = _f(True, "training on a CPU: glibc keeps freed memory in the process (blocks under 1 GiB from "
                                   "its heap, no trimming), so a step reuses the last step's pages instead of "
                                   "page-faulting fresh ones; the resident set stays at its peak. 0 = glibc's defaults "
                                   "(starflow.train.memory)", training=True)
    compile: bool = _f(False, "training: torch.compile every transformer layer (the first steps of each shape pay "
                              "the compilation; sampling has its own --compile switch)")
    wds: bool = _f(False, "read training data from webdataset shards", training=True)
    data: str | None = _f(None, "training data: an image or video folder with metadata.jsonl, a folder of "
                                "webdataset shards (wds 1), or a latent cache (starflow cache-latents)", training=True)
    init_from: str | None = _f(None, "training: start from these weights (.pth/.safetensors, a model folder or a "
                                     "training checkpoint step folder; official flag --resume_path); optimizer, "
                                     "schedule and step start fresh, a restarted run resumes from its own checkpoints",
                            training=True)
    num_workers: int = _f(2, "DataLoader worker processes", training=True)
    logdir: str = _f("runs/starflow", "output folder for checkpoints, samples and metrics", training=True)
    log_freq: int = _f(10, "steps between metric log lines", training=True)
    save_freq: int = _f(1000, "steps between checkpoints", training=True)
    sample_freq: int = _f(10, "epochs between sample grids, as the official flag counts them (an epoch: one pass "
                              "over the training data, its samples / batch_size steps), and one at the last step; "
                              "0 = none", training=True)
    keep_last: int = _f(3, "checkpoints kept on disk", training=True)
    # --- official keys accepted for compatibility --------------------------------------------
    no_flip: bool = _f(False, "no random horizontal flip of training images and clips (0 = flip half of them)",
                       training=True)
    nvp: bool = _f(True, "official flag: affine (shift and scale) flow; only True is supported")
    adaln: bool = _f(False, "official flag: adaptive LayerNorm; only False is supported")
    secondary_data: str | None = _f(None, "video: an image folder trained as one-frame videos on a secondary_ratio "
                                          "share of the steps", training=True)
    secondary_img_size: int | None = _f(None, "video: image side of the secondary data (None = img_size)",
                                       training=True)
    secondary_batch_size: int | None = _f(None, "video: global batch size of secondary steps (None = batch_size)",
                                         training=True)
    secondary_ratio: float = _f(0.0, "video: probability that a step trains on the secondary image data", training=True)

    def __post_init__(self) -> None:
        if self.layers_per_block is None:
            self.layers_per_block = [8]
        if len(self.layers_per_block) > 1:
            self.blocks = len(self.layers_per_block)  # the layer list decides the block count

    # --- derived quantities -----------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        """Number of flow blocks K (SPEC section 1)."""
        return self.blocks if len(self.layers_per_block) == 1 else len(self.layers_per_block)

    @property
    def block_layers(self) -> list[int]:
        """Transformer layers of each flow block, length K."""
        lpb = self.layers_per_block
        return lpb * self.blocks if len(lpb) == 1 else list(lpb)

    @property
    def deep_channels(self) -> int:
        """Width of the deep block."""
        return self.top_block_channels or self.channels

    @property
    def is_video(self) -> bool:
        """Whether this is a video config (``vid_size`` set)."""
        return self.vid_size is not None

    @property
    def fps(self) -> int:
        """Frame rate of sampled videos and of single-rate training clips: the first rate of ``vid_size`` (0 for images)."""
        return self.vid_size[1] if self.vid_size else 0

    @property
    def fps_choices(self) -> tuple[int, ...]:
        """The training clip rates of ``vid_size`` (one drawn per clip; SPEC section 16)."""
        return tuple(self.vid_size[1:]) if self.vid_size else ()

    def latent_size(self, vae_downsample: int) -> int:
        """Latent grid side in cells for this config's ``img_size`` (pixels)."""
        return self.img_size // vae_downsample

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-safe mapping of every field."""
        d = dataclasses.asdict(self)
        if d["vid_size"] is not None:
            d["vid_size"] = ":".join(str(v) for v in d["vid_size"])
        return d


CONFIG_FIELDS = {f.name: f for f in fields(Config)}
"""Every config key (the official YAML names) -> its dataclass field (default, ``metadata["doc"]``)."""

CONFIG_DEFAULTS = {name: f.default for name, f in CONFIG_FIELDS.items() if f.default is not dataclasses.MISSING}
"""Config key -> its default (the official parser's), for keys with a plain default."""

TRAINING_KEYS = frozenset(name for name, f in CONFIG_FIELDS.items() if f.metadata["training"])
"""Config keys only training reads (the fields declared with ``training=True``): the sampling commands reject them
as flags, with a message saying so, rather than accept and ignore them."""


def config_field_help(name: str) -> str:
    """One-line documentation of a config key."""
    return CONFIG_FIELDS[name].metadata.get("doc", "")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """Return (inner type, optional) for annotations like ``int | None``."""
    tp = typing.get_type_hints(Config)[tp] if isinstance(tp, str) else tp
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


_HINTS = typing.get_type_hints(Config)
NOISE_TYPES = ("gaussian", "uniform")
PRECISIONS = ("auto", "bf16", "fp32")
_INT_ONCE_BOOL = {"gradient_checkpoint", "gradient_checkpoint_mlp"}  # official YAMLs write 0/1; true/false also read


def _coerce(key: str, value: Any) -> Any:
    """Convert one raw YAML/CLI value to the field's type, or raise ValueError naming the key."""
    tp, optional = _base_type(_HINTS[key])
    if isinstance(value, str) and value.strip().lower() in ("none", "null", ""):
        if optional:
            return None
        if tp is str:
            return value
        raise ValueError(f"config key '{key}' cannot be None")
    if value is None:
        if optional:
            return None
        raise ValueError(f"config key '{key}' cannot be None")
    try:
        if tp is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if isinstance(value, (bool, int)) and value in (0, 1):
                return bool(value)
            raise ValueError
        if tp is int:
            if key in _INT_ONCE_BOOL and str(value).strip().lower() in ("true", "false"):
                return int(str(value).strip().lower() == "true")
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
            if not math.isfinite(out):
                raise ValueError
            return out
        if tp is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
        if typing.get_origin(tp) is list:  # layers_per_block
            items = value.split() if isinstance(value, str) else ([value] if isinstance(value, int) else list(value))
            out = [int(v) for v in items]
            if not out:
                raise ValueError
            return out
        if typing.get_origin(tp) is tuple:  # vid_size 'frames:fps[:fps2...]'
            parts = value.split(":") if isinstance(value, str) else list(value)
            out = tuple(int(p) for p in parts)
            if len(out) < 2 or min(out) < 1:
                raise ValueError
            return out
    except (ValueError, TypeError):
        pass
    raise ValueError(
        f"config key '{key}' expects {_type_name(_HINTS[key])}, got {value!r} ({config_field_help(key)})"
    )


def _type_name(tp: Any) -> str:
    base, optional = _base_type(tp)
    name = {bool: "0/1 (bool)", int: "an integer", float: "a number", str: "a string"}.get(base)
    if name is None:
        name = "a list of integers like '2 2 24'" if typing.get_origin(base) is list else "'frames:fps' like '81:16' (or 'frames:fps1:fps2')"
    return name + (" or none" if optional else "")


_KEY_ALIASES = {"learning_rate": "lr", "max_lr": "lr", "lr_min": "min_lr", "num_steps": "steps", "max_steps": "steps",
                "train_steps": "steps", "warmup": "warmup_steps", "batch": "batch_size", "global_batch_size": "batch_size",
                "seed_value": "seed", "gradient_accumulation_steps": "grad_accum", "log_dir": "logdir",
                "output_dir": "logdir", "data_dir": "data", "resume_path": "init_from",
                "acc": "grad_accum"}  # other codebases' names of config keys (the official scripts' flags among them)


def _check_key(key: str) -> None:
    if key not in CONFIG_FIELDS:
        near = [_KEY_ALIASES[key]] if key in _KEY_ALIASES else difflib.get_close_matches(key, list(CONFIG_FIELDS), n=1,
                                                                                         cutoff=0.5)
        hint = f"; did you mean '{near[0]}'?" if near else "; see `starflow train --help` for the keys"
        raise ValueError(f"unknown config key '{key}'{hint}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last one silently) and
    aliases (``*name``: a config is plain keys and values; nested aliases of a few hundred bytes expand to gigabytes)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "a YAML alias (*name); write the value out",
                                              self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                repeated = key in seen
            except TypeError:  # an unhashable key: PyYAML's own error says so
                continue
            if repeated:
                raise yaml.constructor.ConstructorError(None, None, f"config key '{key}' is given twice; keep one",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _flatten_official(raw: Any, source: str) -> dict[str, Any]:
    """Accept ``{'arguments': [{'k': v}, ...]}`` (official) or a plain mapping."""
    if raw is None:
        raise ValueError(f"{source}: the config is empty; the configs are in configs/ (every key is documented by "
                         "`starflow train --help`)")
    if not isinstance(raw, Mapping):
        raise ValueError(f"{source}: expected a mapping or an 'arguments:' list, got {type(raw).__name__}")
    if "arguments" in raw:
        if set(raw) != {"arguments"} or not isinstance(raw["arguments"], list):
            raise ValueError(f"{source}: 'arguments:' must be the only top-level key and hold a list of one-key maps")
        out: dict[str, Any] = {}
        for item in raw["arguments"]:
            if not isinstance(item, Mapping) or len(item) != 1:
                raise ValueError(f"{source}: each entry under 'arguments:' must be a one-key map, got {item!r}")
            (key, value), = item.items()
            if key in out:
                raise ValueError(f"{source}: config key '{key}' is given twice ({out[key]!r} and {value!r}); keep one")
            out[key] = value
        return out
    return dict(raw)


GUIDANCE_RULE = "the guidance weight must be >= 0 and finite (0 = no guidance)"
"""What a guidance weight ``cfg`` must be (config key and sampling setting alike)."""


def validate(cfg: Config) -> Config:
    """Check cross-field constraints; raise ValueError naming the offending key."""
    if cfg.seq_order not in ("L2R", "R2L"):
        raise ValueError(f"config key 'seq_order' must be 'L2R' or 'R2L', got {cfg.seq_order!r}")
    for key in ("img_size", "patch_size", "channel_size", "head_dim", "batch_size", "steps", "grad_accum", "log_freq",
                "save_freq", "keep_last"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"config key '{key}' must be >= 1, got {getattr(cfg, key)}")
    if not 0 <= cfg.cfg < float("inf"):
        raise ValueError(f"{GUIDANCE_RULE}, got {cfg.cfg:g} (config key 'cfg')")
    for key in ("sample_freq", "max_nonfinite", "ema_start"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"config key '{key}' must be >= 0 (0 = off), got {getattr(cfg, key)}")
    if cfg.num_blocks < 1:
        raise ValueError(f"config key 'blocks' must be >= 1 (the deep block at least), got {cfg.num_blocks}")
    if any(n < 0 for n in cfg.layers_per_block) or cfg.block_layers[-1] < 1:
        raise ValueError("config key 'layers_per_block': counts must be >= 0 and the deep (last) block needs >= 1")
    for key in ("channels", "deep_channels"):
        width = getattr(cfg, key)
        if width % cfg.head_dim:
            name = "channels" if key == "channels" else "top_block_channels"
            raise ValueError(f"config key '{name}' ({width}) must be a multiple of 'head_dim' ({cfg.head_dim})")
    if cfg.rope and cfg.head_dim % 4:
        raise ValueError(f"config key 'head_dim' ({cfg.head_dim}) must be a multiple of 4 with rope")
    if cfg.rope and cfg.txt_size > 0 and cfg.head_dim // 2 < 8:
        raise ValueError("config key 'head_dim' must be >= 16 with rope and text (8 dims go to the third axis)")
    for key in sorted(_INT_ONCE_BOOL):
        if (getattr(cfg, key) or 0) < 0:
            raise ValueError(f"config key '{key}' is a layer period k >= 0 (0 = off), got {getattr(cfg, key)}")
    for key in ("drop_label", "drop_image", "secondary_ratio"):
        if not 0.0 <= getattr(cfg, key) <= 1.0:
            raise ValueError(f"config key '{key}' is a probability, got {getattr(cfg, key)}")
    if not cfg.temperature > 0:
        raise ValueError(f"config key 'temperature' scales the sampling noise and must be > 0 (1 = the official "
                         f"sampling), got {cfg.temperature}")
    if cfg.noise_std < 0:
        raise ValueError(f"config key 'noise_std' must be >= 0, got {cfg.noise_std}")
    if not cfg.lr > 0:
        raise ValueError(f"config key 'lr' (the peak learning rate) must be > 0, got {cfg.lr}")
    for key in ("txt_size", "min_lr", "weight_decay", "grad_clip", "denoiser_lr", "warmup_steps", "num_workers",
                "soft_clip", "temporal_causal", "denoiser_window", "local_attn_window"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 0:
            raise ValueError(f"config key '{key}' must be >= 0, got {getattr(cfg, key)}")
    if not cfg.nvp:
        raise ValueError("config key 'nvp': only the affine flow (nvp: 1) is supported")
    if cfg.adaln:
        raise ValueError("config key 'adaln': adaptive LayerNorm is not part of the released models; set it to 0")
    if cfg.local_attn_window is not None:
        raise ValueError("config key 'local_attn_window' is not supported (the released models do not use it)")
    if cfg.conditional_denoiser and not cfg.learnable_self_denoiser:
        raise ValueError("config key 'conditional_denoiser' needs 'learnable_self_denoiser: 1'")
    if cfg.cfg > 0 and cfg.txt_size == 0:
        raise ValueError("config key 'cfg' > 0 needs text conditioning ('txt_size' > 0)")
    if cfg.text is not None and cfg.text.endswith(".vocab"):  # class labels (SPEC section 16)
        if cfg.txt_size != 1:
            raise ValueError(f"config key 'text' names class labels ({cfg.text}): set 'txt_size: 1', got {cfg.txt_size}")
        if cfg.fps_cond or cfg.cond_noise_level or cfg.mix_aspect:
            raise ValueError("class labels (a .vocab 'text') are looked up as given: 'fps_cond', 'cond_noise_level' "
                             "and 'mix_aspect' would rewrite them; set them to 0")
        tagged = [k for k in ("drop_image", "video_to_video", "last_frame_cond") if getattr(cfg, k) and cfg.vid_size]
        if tagged:
            raise ValueError(f"class labels (a .vocab 'text') are looked up as given: '{tagged[0]}' prefixes the "
                             "caption with a tag ('(extend) ', '(v2v) ' or '(last) ') that is no class; set it to 0, "
                             "or condition on text (a T5 'text')")
    if cfg.finetuned_vae is not None:
        raise ValueError(f"config key 'finetuned_vae' ({cfg.finetuned_vae!r}) is not supported yet: the VAE's own "
                         "decoder is used; set it to none")
    if cfg.logdir.strip().lower() in ("", "none", "null"):
        raise ValueError(f"config key 'logdir' ({cfg.logdir!r}) names no folder: pass the folder for the run's "
                         "checkpoints, metrics and model")
    if cfg.min_lr > cfg.lr:
        raise ValueError(f"config key 'min_lr' ({cfg.min_lr:g}) is above 'lr' ({cfg.lr:g}): the cosine schedule decays "
                         "from lr to min_lr; set min_lr <= lr")
    if cfg.lora_rank < 0:
        raise ValueError(f"config key 'lora_rank' must be >= 0 (0 = no LoRA), got {cfg.lora_rank}")
    if cfg.lora_rank and cfg.ema > 0:
        raise ValueError("config keys 'lora_rank' and 'ema' together are not supported (the EMA would average only "
                         "the adapters): set --ema 0 for a LoRA run")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"config key 'precision' must be one of {PRECISIONS}, got {cfg.precision!r}")
    if cfg.noise_type not in NOISE_TYPES:
        raise ValueError(f"config key 'noise_type' must be one of {NOISE_TYPES}, got {cfg.noise_type!r}")
    if cfg.noise_type == "uniform" and cfg.vae is not None:
        raise ValueError("config key 'noise_type: uniform' dequantises 8-bit pixels: it needs 'vae: none'")
    for key in ("video_to_video", "last_frame_cond", "secondary_data"):
        if getattr(cfg, key) and not cfg.is_video:
            raise ValueError(f"config key '{key}' is for video configs (set 'vid_size')")
    for key, needs in _idle_keys(cfg, refused=True).items():
        raise ValueError(f"config key '{key}' ({getattr(cfg, key)}) acts only with {needs}: set that, or drop the key")
    if cfg.drop_image > 0 and (cfg.video_to_video or cfg.last_frame_cond):
        raise ValueError("config key 'drop_image' is not combined with 'video_to_video' / 'last_frame_cond' here: set "
                         "it to 0 (drop_image: 0 in the config file; when training, --drop_image 0 does too)")
    if cfg.video_to_video and cfg.last_frame_cond:
        raise ValueError("config keys 'video_to_video' and 'last_frame_cond' are two data modes: set one")
    for key in ("secondary_img_size", "secondary_batch_size", "pt_seq_len"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 1:
            raise ValueError(f"config key '{key}' must be >= 1, got {getattr(cfg, key)}"
                             + (" (leave it out for its default, the latent side // patch_size)"
                                if key == "pt_seq_len" else ""))
    return cfg


def _key_rules(cfg: Config) -> list[tuple[str, bool, str, bool]]:
    """The keys that act only with others: ``(key, whether it cannot act in cfg, what it needs, refused)``.
    ``refused``: a config setting it where it cannot act is refused when it loads; the others a saved model may
    carry (:func:`inactive_keys`)."""
    text = "text conditioning (txt_size > 0)"
    return [("lora_alpha", cfg.lora_rank == 0, "lora_rank > 0", True),
            ("lora_targets", cfg.lora_rank == 0, "lora_rank > 0", True),
            ("ema_start", cfg.ema == 0, "ema > 0", True),
            ("denoiser_lr", not cfg.learnable_self_denoiser, "learnable_self_denoiser: 1", True),
            ("pt_seq_len", not cfg.rope, "rope: 1", False),
            ("denoiser_window", not cfg.learnable_self_denoiser, "learnable_self_denoiser: 1", False),
            ("denoiser_window", not cfg.temporal_causal, "temporal_causal > 0 (the window is over causal frames)",
             False),
            ("text", cfg.txt_size == 0, text, False), ("cond_top_only", cfg.txt_size == 0, text, False),
            ("fps_cond", cfg.txt_size == 0, text, False), ("conditional_denoiser", cfg.txt_size == 0, text, False),
            ("denoiser_lr", cfg.lora_rank > 0, "lora_rank 0 (a LoRA run keeps the learnable denoiser frozen)", False)]


def _idle_keys(cfg: Config, refused: bool) -> dict[str, str]:
    """``{key: what it needs}`` of the :func:`_key_rules` keys with that ``refused`` which the config sets (to other
    than their default) where they cannot act."""
    out: dict[str, str] = {}
    for key, off, needs, always in _key_rules(cfg):
        if always == refused and off and getattr(cfg, key) != CONFIG_DEFAULTS[key]:
            out.setdefault(key, needs)
    return out


def inactive_keys(cfg: Config) -> dict[str, str]:
    """``{key: what it needs}`` of the keys set (to other than their default) that cannot act with the config's other
    keys: ``pt_seq_len`` without ``rope``, ``denoiser_window`` without a learned denoiser or ``temporal_causal``,
    ``text`` / ``cond_top_only`` / ``fps_cond`` / ``conditional_denoiser`` without text, ``denoiser_lr`` in a LoRA run
    (its denoiser stays frozen). Saved models may carry them (a model trained unconditional from a text config): the
    commands refuse them as flags and note them in a config. (Others, such as ``lora_alpha`` without LoRA, are refused
    when a config loads.)"""
    return _idle_keys(cfg, refused=False)


def check_inactive(cfg: Config, flags: Mapping[str, Any], note: Callable[[str], None]) -> None:
    """Refuse the keys of :func:`inactive_keys` given as command-line ``flags`` (``{key: raw value}``); ``note`` the
    ones the config file set.

    Raises:
        ValueError: ``--KEY V acts only with ...``, naming the first such flag.
    """
    inactive = inactive_keys(cfg)
    for key, needs in inactive.items():
        if key in flags:
            raise ValueError(f"--{key} {flags[key]} acts only with {needs}, which this config does not set: drop it")
    for key, needs in inactive.items():
        note(f"note: config key '{key}' ({getattr(cfg, key)}) is unused: it acts only with {needs}")


def load_config(source: str | Path | Mapping[str, Any] | Config, overrides: Mapping[str, Any] | None = None) -> Config:
    """Load a config from a YAML path, a mapping of YAML keys, or a Config.

    Args:
        source: path to a YAML file (official ``arguments:`` list or plain mapping), a dict with
            YAML keys (values may be Python values or the official strings), or a Config.
        overrides: keys that take precedence over ``source`` (e.g. from the command line).

    Returns:
        A validated :class:`Config`; keys not given take the official parser's defaults.

    Raises:
        FileNotFoundError: the YAML file does not exist.
        ValueError: an unknown key (with the nearest valid key), an ill-typed value, or
            contradicting keys.
    """
    if isinstance(source, Config):
        raw = source.to_dict()
        name = "config"
    elif isinstance(source, Mapping):
        raw = _flatten_official(source, "config")
        name = "config"
    else:
        path = Path(source)
        if path.is_dir():
            raise FileNotFoundError(f"{path} is a folder: " + (f"pass its config, {path / 'config.yaml'}"
                                    if (path / "config.yaml").is_file() else
                                    "pass a config file (YAML; the official ones are in configs/)"))
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path} (the official configs are in configs/)")
        try:
            text = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            where = getattr(e, "problem_mark", None)
            line = f" at line {where.line + 1}" if where is not None else ""
            raise ValueError(f"config {path}: not a readable YAML file{line} ({getattr(e, 'problem', None) or e}); "
                             "the official configs are in configs/") from None
        raw = _flatten_official(text, str(path))
        name = str(path)
    overrides = dict(overrides or {})
    if "layers_per_block" in overrides and "blocks" not in overrides:
        try:  # a new list of layers decides the block count; one number keeps the file's 'blocks'
            several = len(_coerce("layers_per_block", overrides["layers_per_block"])) > 1
        except ValueError:
            several = False  # (refused with the flag's name below)
        if several:
            raw = {k: v for k, v in raw.items() if k != "blocks"}
    values: dict[str, Any] = {}
    for src, where in ((raw, None), (overrides, "override")):
        for key, value in src.items():
            try:
                _check_key(key)
                values[key] = _coerce(key, value)
            except ValueError as e:  # an override's bad value is the command line's (--KEY VALUE), not the file's
                raise ValueError(f"--{key} {value}: {e}" if where else f"{name}: {e}") from None
    if "blocks" in values and len(values.get("layers_per_block", [])) > 1:
        if values["blocks"] != len(values["layers_per_block"]):
            raise ValueError(
                f"{name}: config key 'blocks' ({values['blocks']}) contradicts 'layers_per_block' "
                f"({len(values['layers_per_block'])} entries); drop 'blocks' or make them agree"
            )
    try:
        return validate(Config(**values))
    except ValueError as e:  # a contradiction a command-line value made: named by its flag, as the user typed it
        given = [key for key in re.findall(r"config keys? '(\w+)'", str(e)) if key in overrides]
        if given and not str(e).startswith("--"):
            raise ValueError(f"--{given[0]} {overrides[given[0]]}: {e}") from None
        raise


def apply_overrides(cfg: Config, overrides: Mapping[str, Any]) -> Config:
    """Return a new validated Config with ``overrides`` (CLI values) applied on top of ``cfg``."""
    return load_config(cfg, {k: v for k, v in overrides.items() if v is not None})


def save_config(cfg: Config, path: str | Path) -> None:
    """Write ``cfg`` as YAML in the official ``arguments:`` format (loadable by :func:`load_config`), atomically: a
    killed write leaves no truncated config that would load as another one."""
    items = [{k: v} for k, v in cfg.to_dict().items()]
    for item in items:
        (k, v), = item.items()
        if isinstance(v, list):
            item[k] = " ".join(str(i) for i in v)
    from starflow.files import write_text_atomic  # (I/O: not loaded with the config by `import starflow.models`)

    write_text_atomic(path, yaml.safe_dump({"arguments": items}, sort_keys=False))

