"""What a config costs before any weights or data exist: parameters, token counts and memory.

``starflow validate CONFIG`` prints this report. The model is built on the meta device (no memory), so
the 3B and 7B layouts are counted exactly in a fraction of a second. Memory figures are estimates in
bytes (reported in GiB = 2**30 bytes):

* weights: parameters x bytes per element (fp32 4, bf16 2);
* KV cache: what sampling allocates for one flow block at a time (the largest block counts):
  ``2 (k, v) x layers x rows x (text + tokens) x width`` elements, rows doubled for guidance in
  text-conditioned blocks and multiplied by the frames for frame-local shallow blocks;
* training activations per device for a micro-batch, kept for the backward pass. Per transformer layer
  and token about ``ACTIVATION_VALUES_PER_WIDTH = 16`` values of the layer width are stored without
  checkpointing (normed input, q/k/v, attention output, projection, MLP input, 4x hidden before and
  after the activation, output; attention through SDPA stores no attention matrix); with activation
  checkpointing of attention and MLP only the layer input is stored, plus one layer's full activations
  while it is recomputed.
* training state: gradients in the parameter dtype and two fp32 Adam moments, divided over ``gpus`` ranks
  when sharded (FSDP).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from starflow.adapters.geometry import geometry_is_known, vae_geometry
from starflow.adapters.labels import is_vocab, read_vocab
from starflow.adapters.text import TINY_T5
from starflow.assets import TINY_TEXT_ENCODER, resolve_asset
from starflow.config import Config
from starflow.data.aspect import ASPECT_RATIOS, aspect_to_size
from starflow.models import STARFlow
from starflow.models.layers import AttentionBlock
from starflow.models.tarflow_block import FlowBlock
from starflow.models.lora import lora_parameter_count

__all__ = ["BlockCount", "TokenLayout", "MemoryEstimate", "SizeReport", "size_report", "text_width", "build_meta_model",
           "latent_shape", "trained_latent_frames",
           "KNOWN_TEXT_WIDTHS", "ACTIVATION_VALUES_PER_WIDTH"]

KNOWN_TEXT_WIDTHS = {"google/flan-t5-xl": 2048, "google/t5-v1_1-xl": 2048, "google/flan-t5-xxl": 4096,
                     "google/flan-t5-large": 1024, "google/flan-t5-base": 768, "google/flan-t5-small": 512}
"""Hidden width of common T5 encoders, so a config can be sized without downloading them."""
ACTIVATION_VALUES_PER_WIDTH = 16
GIB = 2 ** 30
DTYPE_BYTES = {"fp32": 4, "bf16": 2}


def text_width(cfg: Config, base_dir: Path | None = None) -> int | None:
    """Hidden width of the config's text encoder without loading its weights.

    Order: ``txt_size == 0`` -> None; the ``tiny-t5`` preset; a local folder's ``config.json``;
    :data:`KNOWN_TEXT_WIDTHS`; the Hugging Face cache or Hub (``transformers.AutoConfig``).

    Raises:
        FileNotFoundError: the width cannot be found (pass ``--txt_dim``).
    """
    if cfg.txt_size == 0:
        return None
    if cfg.text == TINY_TEXT_ENCODER:
        return TINY_T5["d_model"]
    if is_vocab(cfg.text):  # one-hot class labels: K names + the unconditional row
        return len(read_vocab(resolve_asset(cfg.text, base_dir))) + 1
    name = resolve_asset(cfg.text, base_dir)
    if name in KNOWN_TEXT_WIDTHS:
        return KNOWN_TEXT_WIDTHS[name]
    try:
        from transformers import AutoConfig

        from starflow.adapters.hub import hub_offline

        return AutoConfig.from_pretrained(name, local_files_only=hub_offline()).d_model
    except Exception as e:  # noqa: BLE001 - any loader failure means the same thing here
        where = f" (no folder {Path(base_dir) / cfg.text} beside the config, " if base_dir is not None else " ("
        raise FileNotFoundError(f"cannot find the text encoder {cfg.text!r}{where}nor in the Hugging Face cache or "
                                f"Hub: {type(e).__name__}): restore its folder, or point the config's 'text' at the "
                                "T5 (`starflow download` fetches the released ones; validate and train --dry_run take "
                                "its width alone, --txt_dim 2048 for google/flan-t5-xl)") from e


@dataclass
class BlockCount:
    """Parameters of one top-level part of the model (a flow block or the learnable denoiser)."""

    name: str
    kind: str  # "shallow", "deep", "identity", "denoiser"
    layers: int
    width: int
    parameters: int
    text_conditioned: bool = False


@dataclass
class TokenLayout:
    """Sizes of one aspect-ratio bucket: pixels ``(frames, h, w)``, latent ``(T', C, h', w')`` and tokens."""

    aspect_ratio: str
    pixels: tuple[int, int, int]
    latent: tuple[int, int, int, int]
    tokens_per_frame: int
    tokens: int


@dataclass
class MemoryEstimate:
    """Bytes per device for one dtype (see the module docstring for the formulas)."""

    dtype: str
    weights: int
    kv_cache: int
    activations: int
    activations_checkpointed: int
    training_state: int
    ema: int = 0


@dataclass
class SizeReport:
    """Everything ``starflow validate`` prints about a config."""

    blocks: list[BlockCount]
    total_parameters: int
    layouts: list[TokenLayout]
    txt_size: int
    txt_dim: int | None
    batch: int
    gpus: int
    memory: list[MemoryEstimate] = field(default_factory=list)
    trainable_parameters: int = 0


def trained_latent_frames(cfg: Config, clip_latent_frames: int) -> int:
    """Latent frames of one training sample whose clip has ``clip_latent_frames``: plus the source clip trained before
    it (``video_to_video``) or the end frame (``last_frame_cond``)."""
    if cfg.video_to_video:
        return 2 * clip_latent_frames
    return clip_latent_frames + 1 if cfg.last_frame_cond else clip_latent_frames


def _frames(cfg: Config) -> tuple[int, int]:
    """(pixel frames, latent frames) of one training sample; images are one frame."""
    if not cfg.is_video:
        return 1, 1
    frames = cfg.vid_size[0]
    latent = vae_geometry(cfg.vae).latent_frames(frames)
    return trained_latent_frames(cfg, frames), trained_latent_frames(cfg, latent)


def token_layouts(cfg: Config, vae_downsample: int) -> list[TokenLayout]:
    """One :class:`TokenLayout` per aspect-ratio bucket (all of them with ``mix_aspect``, else ``1:1``)."""
    frames, latent_frames = _frames(cfg)
    m = vae_downsample * cfg.patch_size
    out = []
    for ratio in ASPECT_RATIOS if cfg.mix_aspect else ("1:1",):
        h, w = aspect_to_size(ratio, cfg.img_size, m)
        per_frame = (h // m) * (w // m)
        out.append(TokenLayout(ratio, (frames, h, w), (latent_frames, cfg.channel_size, h // vae_downsample,
                                                        w // vae_downsample), per_frame, per_frame * latent_frames))
    return out


def latent_shape(cfg: Config, aspect_ratio: str = "1:1") -> tuple[int, ...]:
    """The latent one sample of ``cfg`` is, from the config alone (the VAE named by ``cfg.vae``, not loaded):
    ``(C, h, w)`` for an image model, ``(T', C, h, w)`` for a video model (``T'`` latent frames of a training sample:
    ``vid_size``'s, doubled for ``video_to_video``, one more for ``last_frame_cond``).

    Raises:
        ValueError: an aspect ratio the config has no bucket for.
    """
    layouts = {layout.aspect_ratio: layout for layout in token_layouts(cfg, vae_geometry(cfg.vae).downsample)}
    if aspect_ratio not in layouts:
        raise ValueError(f"aspect ratio {aspect_ratio} is not one of this config's: {', '.join(layouts)}")
    latent = layouts[aspect_ratio].latent
    return latent if cfg.is_video else latent[1:]


def build_meta_model(cfg: Config, txt_dim: int | None) -> STARFlow:
    """The config's STARFlow on the meta device (no memory), sized for the VAE its ``vae`` key names.

    Raises:
        ValueError: an ``img_size`` that the named VAE's factor x ``patch_size`` does not divide, where the name tells
            the factor (:func:`~starflow.adapters.geometry.geometry_is_known`; another VAE is checked when it loads).
    """
    if geometry_is_known(cfg.vae):
        vae_geometry(cfg.vae).check_img_size(cfg.img_size, cfg.patch_size)
    with torch.device("meta"):
        return STARFlow.from_config(cfg, txt_dim=txt_dim, vae_downsample=vae_geometry(cfg.vae).downsample)


def _block_counts(model: STARFlow) -> list[BlockCount]:
    counts = []
    last = len(model.blocks) - 1
    for i, block in enumerate(model.blocks):
        n = sum(p.numel() for p in block.parameters())
        if isinstance(block, FlowBlock):
            counts.append(BlockCount(f"blocks.{i}", "deep" if i == last else "shallow", len(block.attn_blocks),
                                     block.proj_in.out_features, n, block.text_conditioned))
        else:
            counts.append(BlockCount(f"blocks.{i}", "identity", 0, 0, 0))
    den = model.learnable_self_denoiser
    if den is not None:
        layers = sum(isinstance(m, AttentionBlock) for m in den.modules())
        counts.append(BlockCount("learnable_self_denoiser", "denoiser", layers, model.config.channels,
                                 sum(p.numel() for p in den.parameters()), den.proj_txt is not None))
    return counts


def _kv_elements(cfg: Config, counts: list[BlockCount], layout: TokenLayout, batch: int) -> int:
    """Largest per-block KV cache of sampling, in elements."""
    frames = layout.latent[0]
    guided = cfg.cfg > 0
    worst = 0
    for b in counts:
        if b.kind not in ("shallow", "deep"):
            continue
        local = cfg.is_video and cfg.shallow_block_local and b.kind == "shallow"
        rows = batch * (frames if local else 1) * (2 if guided and b.text_conditioned else 1)
        length = (layout.tokens_per_frame if local else layout.tokens) + (cfg.txt_size if b.text_conditioned else 0)
        worst = max(worst, 2 * b.layers * rows * length * b.width)
    return worst


def _activation_elements(cfg: Config, counts: list[BlockCount], layout: TokenLayout, batch: int) -> tuple[int, int]:
    """Training activations (without, with checkpointing) for a micro-batch, in elements."""
    full, kept, biggest = 0, 0, 0
    for b in counts:
        if b.layers == 0:
            continue
        length = layout.tokens + (cfg.txt_size if b.text_conditioned else 0)
        per_layer = batch * length * b.width
        full += ACTIVATION_VALUES_PER_WIDTH * per_layer * b.layers
        kept += per_layer * b.layers
        biggest = max(biggest, ACTIVATION_VALUES_PER_WIDTH * per_layer)
    return full, kept + biggest


def size_report(cfg: Config, txt_dim: int | None, batch: int = 1, gpus: int = 1) -> SizeReport:
    """Count a config's parameters on the meta device and estimate its token counts and memory.

    Args:
        cfg: the config.
        txt_dim: text encoder width (see :func:`text_width`), None for ``txt_size == 0``.
        batch: samples per device for the KV cache (sampling) and activation (training) estimates.
        gpus: ranks the weights, gradients and optimizer state are sharded over (with ``fsdp``; with ``fsdp: 0``
            every rank holds them whole, as DDP does).

    Returns:
        A :class:`SizeReport`; memory estimated for the largest aspect-ratio bucket (most tokens).
    """
    model = build_meta_model(cfg, txt_dim)
    counts = _block_counts(model)
    total = sum(p.numel() for p in model.parameters())
    layouts = token_layouts(cfg, vae_geometry(cfg.vae).downsample)
    worst = max(layouts, key=lambda t: t.tokens)
    report = SizeReport(counts, total, layouts, cfg.txt_size, txt_dim, batch, gpus)
    kv = _kv_elements(cfg, counts, worst, batch)
    act, act_ckpt = _activation_elements(cfg, counts, worst, batch)
    trainable = lora_parameter_count(model, cfg) if cfg.lora_rank else total
    report.trainable_parameters = trainable
    shards = gpus if cfg.fsdp else 1
    for name, nbytes in DTYPE_BYTES.items():
        state = trainable * nbytes + trainable * 8  # gradients (param dtype) + fp32 Adam moments
        weights = (total + (trainable if cfg.lora_rank else 0)) * nbytes  # LoRA adds its adapters
        ema = trainable * 4 if cfg.ema > 0 else 0  # an fp32 copy of the trained weights
        report.memory.append(MemoryEstimate(name, weights // shards, kv * nbytes, act * nbytes,
                                            act_ckpt * nbytes, state // shards, ema // shards))
    return report


def format_report(report: SizeReport, cfg: Config) -> str:
    """The report as the text ``starflow validate`` prints."""
    lines = [f"{'part':<26}{'kind':<10}{'layers':>7}{'width':>7}{'text':>6}{'parameters':>16}"]
    for b in report.blocks:
        lines.append(f"{b.name:<26}{b.kind:<10}{b.layers:>7}{b.width:>7}{'yes' if b.text_conditioned else '-':>6}"
                     f"{b.parameters:>16,}")
    lines.append(f"{'total':<56}{report.total_parameters:>16,}")
    if cfg.lora_rank:
        lines.append(f"{f'trained: LoRA adapters (rank {cfg.lora_rank})':<56}{report.trainable_parameters:>16,}")
    den = sum(b.parameters for b in report.blocks if b.kind == "denoiser")
    if den:
        lines.append(f"{'  of which flow':<56}{report.total_parameters - den:>16,}")
    lines.append("")
    text = f"text: {report.txt_size} tokens x {report.txt_dim} (text encoder width)" if report.txt_dim else "text: none"
    geometry = vae_geometry(cfg.vae)
    lines.append(f"{text}; vae: {cfg.vae or 'none'} (spatial /{geometry.downsample}, temporal "
                 f"/{geometry.temporal_downsample if cfg.is_video else 1}); patch {cfg.patch_size}")
    lines.append(f"{'aspect':<8}{'pixels (T, H, W)':<22}{'latent (T, C, H, W)':<24}{'tokens/frame':>13}{'tokens':>9}")
    for t in report.layouts:
        lines.append(f"{t.aspect_ratio:<8}{str(t.pixels):<22}{str(t.latent):<24}{t.tokens_per_frame:>13,}{t.tokens:>9,}")
    lines.append("")
    sharding = "" if report.gpus == 1 else (" sharded (FSDP)" if cfg.fsdp else " replicated (fsdp 0)")
    lines.append(f"estimated memory per device in GiB (batch {report.batch} per device, {report.gpus} device(s)"
                 f"{sharding}, "
                 f"largest bucket, guidance rows {'on' if cfg.cfg > 0 else 'off'}):")
    lines.append(f"{'':<44}" + "".join(f"{m.dtype:>10}" for m in report.memory))
    rows = [("weights", "weights"), ("KV cache, sampling (largest block)", "kv_cache"),
            ("training activations, no checkpointing", "activations"),
            ("training activations, checkpointed", "activations_checkpointed"),
            ("gradients + Adam moments (fp32) of trained", "training_state")]
    if cfg.ema > 0:
        rows.append((f"EMA of the weights (fp32, decay {cfg.ema:g})", "ema"))
    for label, attr in rows:
        lines.append(f"{label:<44}" + "".join(f"{getattr(m, attr) / GIB:>10.2f}" for m in report.memory))
    return "\n".join(lines)
