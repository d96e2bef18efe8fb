"""STARFlow: a stack of affine autoregressive flow blocks over patchified (video) latents.

STARFlow (arXiv 2506.06276, Sec. 3) stacks ``K`` flow blocks: ``K - 1`` shallow blocks and one deep,
text-conditioned block; consecutive blocks read the tokens in alternating orders. STARFlow-V
(arXiv 2511.20462) runs the same flow over ``(B, T, C, H, W)`` video latents, causal in time.
Data -> noise runs ``blocks[0] .. blocks[K-1]``; sampling runs them in reverse (SPEC sections 4-8).
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
from torch import nn

from starflow.config import Config, load_config
from starflow.models.denoiser import Denoiser
from starflow.models.jacobi import (JACOBI_BLOCK_SIZE, JACOBI_MAX_ITER, JACOBI_THRESHOLD, DecodeStats, JacobiSettings,
                                    RankSync, decode_block)
from starflow.models.layers import Rope, set_activation_checkpointing
from starflow.models.rope import rope_angles, rope_rotation
from starflow.models.tarflow_block import FlowBlock, IdentityBlock, gathered

__all__ = ["STARFlow", "FlowOutput", "patchify", "unpatchify", "HALF_LOG_2PI", "noised_data", "DEQUANTISED_BITS"]

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
DEQUANTISED_BITS = math.log2(128)  # noise_type uniform: [-1, 1] -> [0, 256), log-Jacobian per dimension in bits


def noised_data(latents: torch.Tensor, unit_noise: torch.Tensor, config: Config) -> torch.Tensor:
    """The data the flow models (STARFlow Sec. 3.1; SPEC section 16): ``latents + noise_std * unit_noise`` with
    ``unit_noise ~ N(0, I)``, or for ``noise_type: uniform`` the 8-bit dequantisation
    ``((latents + 1) 127.5 + unit_noise) / 256 * 2 - 1`` with ``unit_noise ~ U[0, 1)``; draw it with
    ``torch.rand if config.noise_type == "uniform" else torch.randn``. Shapes: any, the same for both."""
    if config.noise_type == "uniform":
        return ((latents + 1) * 127.5 + unit_noise) / 256 * 2 - 1
    return latents + config.noise_std * unit_noise


def _inference(sample: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Run a sampling method under ``torch.inference_mode`` and hand back ordinary tensors.

    Inference mode drops autograd's bookkeeping (version counters, view tracking) from every op: token-by-token
    decoding, a few dozen small ops per token and layer, is ~10% faster on a CPU than under ``no_grad``. Tensors
    made in inference mode may not be changed in place or saved for backward outside it, so the result and
    the tensors appended to an ``intermediates=`` list are cloned out of it (one copy of the samples); caches
    the model keeps across calls are built outside it (:meth:`STARFlow._rope_table`).
    """
    @functools.wraps(sample)
    def wrapper(*args, **kwargs) -> torch.Tensor:
        kept = kwargs.get("intermediates")
        before = 0 if kept is None else len(kept)
        with torch.inference_mode():
            out = sample(*args, **kwargs)
        if kept is not None:
            kept[before:] = [t.clone() for t in kept[before:]]
        return out.clone()
    return wrapper


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """``(B, [T,] C, H, W) -> (B, [T,] H/p, W/p, p*p*C)`` with the last axis ordered ``(p1, p2, c)`` (SPEC section 2).

    Raises:
        ValueError: ``H`` or ``W`` is not a multiple of ``p``.
    """
    *lead, c, h, w = x.shape
    if h % p or w % p:
        raise ValueError(f"patchify: a {h}x{w} input does not split into {p}x{p} patches; its sides must be "
                         f"multiples of patch_size {p}")
    x = x.reshape(*lead, c, h // p, p, w // p, p)
    n = len(lead)
    perm = list(range(n)) + [n + 1, n + 3, n + 2, n + 4, n]  # (..., h/p, w/p, p1, p2, c)
    return x.permute(perm).reshape(*lead, h // p, w // p, p * p * c)


def unpatchify(t: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(B, [T,] h, w, p*p*C) -> (B, [T,] C, h*p, w*p)``."""
    *lead, h, w, d = t.shape
    c = d // (p * p)
    t = t.reshape(*lead, h, w, p, p, c)
    n = len(lead)
    perm = list(range(n)) + [n + 4, n, n + 2, n + 1, n + 3]  # (..., c, h, p1, w, p2)
    return t.permute(perm).reshape(*lead, c, h * p, w * p)


@dataclass
class FlowOutput:
    """Result of the data -> noise map.

    Attributes:
        z: noise, same layout as the input ``x`` (float32).
        logdets: one float32 tensor per block of per-element log-determinants (nats), token layout
            ``(B, N, D)``, or ``(B, T, N_frame, D)`` for frame-local shallow blocks.
        outputs: the token grids ``(B, [T,] h, w, D)`` before block 0 and after every block.
    """

    z: torch.Tensor
    logdets: list[torch.Tensor]
    outputs: list[torch.Tensor]


class STARFlow(nn.Module):
    """Transformer autoregressive normalizing flow (STARFlow / STARFlow-V).

    Build with :meth:`from_config`. Parameter names match the released checkpoints (SPEC section 3).
    """

    def __init__(self, config: Config, txt_dim: int | None, vae_downsample: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.txt_dim = txt_dim if config.txt_size > 0 else None
        if config.txt_size > 0 and not txt_dim:
            raise ValueError("a text-conditioned config (txt_size > 0) needs txt_dim, the text encoder's width")
        if vae_downsample is None and config.vae is not None:
            raise ValueError(f"config vae {config.vae!r} names an autoencoder: pass vae_downsample, its spatial factor "
                             "(the loaded adapter's .downsample, or starflow.adapters.vae_geometry(name).downsample)")
        down = vae_downsample or 1
        self.patch_size = config.patch_size
        self.token_dim = config.patch_size ** 2 * config.channel_size
        latent_side = config.latent_size(down)
        self.latent_side = latent_side  # latent height/width at the configured img_size
        self.pos_scale = float(config.pt_seq_len or latent_side // config.patch_size)
        self._rope_tables: dict[tuple, Rope] = {}  # (frames, h, w, text, three_axis, device) -> rotation table
        k = config.num_blocks
        blocks: list[nn.Module] = []
        for i, layers in enumerate(config.block_layers):
            deep = i == k - 1
            if layers == 0:
                blocks.append(IdentityBlock())
                continue
            conditioned = config.txt_size > 0 and (deep or not config.cond_top_only)
            blocks.append(FlowBlock(
                self.token_dim, config.deep_channels if deep else config.channels, layers, config.head_dim,
                self.txt_dim if conditioned else None, config.sos, config.use_softplus,
                config.use_final_norm, config.soft_clip))
        self.blocks = nn.ModuleList(blocks)
        self.learnable_self_denoiser = None
        if config.learnable_self_denoiser:
            self.learnable_self_denoiser = Denoiser(
                self.token_dim, config.channels, config.head_dim,
                self.txt_dim if config.conditional_denoiser else None, config.temporal_causal,
                config.denoiser_window)
        mlp_every = config.gradient_checkpoint_mlp
        self.set_activation_checkpointing(config.gradient_checkpoint,
                                          config.gradient_checkpoint if mlp_every is None else mlp_every)
        self.reset_parameters()

    @classmethod
    def from_config(cls, config: Config | dict | str, txt_dim: int | None = None,
                    vae_downsample: int | None = None) -> "STARFlow":
        """Build from a :class:`Config`, a mapping of YAML keys, or a YAML path.

        Args:
            config: the model's configuration.
            txt_dim: hidden width of the text encoder (2048 for flan-t5-xl); needed when ``txt_size > 0``.
            vae_downsample: spatial downsampling of the latent space; may be omitted only for pixel models
                (``vae: none``).

        Raises:
            ValueError: a text-conditioned config without ``txt_dim``, or a config with a VAE without
                ``vae_downsample``.
        """
        return cls(load_config(config), txt_dim, vae_downsample)

    def set_activation_checkpointing(self, attention_every: int, mlp_every: int) -> None:
        """Checkpoint attention (resp. MLP) activations in every k-th layer of each flow block and the denoiser.

        Called at construction with the config's ``gradient_checkpoint`` and ``gradient_checkpoint_mlp`` (None: the
        same as ``gradient_checkpoint``);
        layer ``j`` of each stack is checkpointed when ``j % k == 0`` (``k = 0``: off). Only training
        forward passes with gradients are affected; values and gradients are unchanged.

        Raises:
            ValueError: a period is negative.
        """
        for layers in self._layer_stacks():
            set_activation_checkpointing(layers, attention_every, mlp_every)

    def reset_parameters(self) -> None:
        """All initialisation in one place: zero ``proj_out.weight`` and ``final_norm.weight``, N(0, 1) ``sos_embed``."""
        for module in self.modules():
            if isinstance(module, FlowBlock):
                nn.init.normal_(module.sos_embed)
                nn.init.zeros_(module.proj_out.weight)
                if module.final_norm is not None:
                    nn.init.zeros_(module.final_norm.weight)
        if self.learnable_self_denoiser is not None:
            self.learnable_self_denoiser.reset_parameters()

    # ------------------------------------------------------------------ token layout
    @property
    def num_blocks(self) -> int:
        """Flow blocks, the deep block included."""
        return len(self.blocks)

    def compile_layers(self, mode: str | None = None) -> None:
        """Compile every flow-block transformer layer in place with ``torch.compile(dynamic=True)``.

        Sampling steps (one token or a Jacobi chunk) attend over the written part of the preallocated KV cache, so a
        layer sees fixed buffers and a symbolic token count, start and length: it compiles a few times
        (text prefix, one token, a chunk), not once per position. Parameter names do not change
        (``nn.Module.compile``); the first samples pay the compilation.

        The layers share one code object, and sizes 0 and 1 (first position, one token, one row) specialise,
        so the variants (with or without text rows, RoPE, guidance rows) exceed dynamo's default recompile
        limit of 8; it is raised to at least 64 for the process.

        Args:
            mode: ``torch.compile`` mode (e.g. ``"max-autotune"``); None = the default.
        """
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for block in self.blocks:
            for layer in getattr(block, "attn_blocks", ()):
                layer.compile(dynamic=True, mode=mode)

    def compile_training(self, mode: str | None = None) -> None:
        """Compile every transformer layer (flow blocks and the learnable denoiser) in place for training (config
        ``compile: 1``), each layer one ``torch.compile`` unit as FSDP2 shards them: norms, RoPE, attention and MLP
        fuse into a few kernels, forward and backward. Parameter names do not change; each token layout (aspect
        bucket, text length) compiles once in its first step. Call it before sharding.

        Args:
            mode: ``torch.compile`` mode (e.g. ``"max-autotune"``); None = the default.
        """
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for stack in self._layer_stacks():
            for layer in stack:
                layer.compile(mode=mode)

    def _layer_stacks(self) -> list[nn.ModuleList]:
        """The transformer layer lists: each flow block's, then the learnable denoiser's."""
        stacks = [b.attn_blocks for b in self.blocks if isinstance(b, FlowBlock)]
        if self.learnable_self_denoiser is not None:
            stacks.append(self.learnable_self_denoiser.attn_blocks)
        return stacks

    def block_name(self, i: int) -> str:
        """``"flow block 3 (deep)"``, ``"flow block 0 (shallow)"``: block ``i`` as profiles and logs name it."""
        return f"flow block {i} ({'deep' if i == self.num_blocks - 1 else 'shallow'})"

    def block_flips(self, i: int) -> bool:
        """Whether block ``i`` reads tokens in the flipped order (SPEC section 5)."""
        return (i + 1) % 2 == 1 if self.config.seq_order == "L2R" else i % 2 == 1

    def _frame_local(self, i: int, video: bool) -> bool:
        return video and self.config.shallow_block_local and i < self.num_blocks - 1

    def _to_sequence(self, grid: torch.Tensor, i: int) -> torch.Tensor:
        """Token grid ``(B, [T,] h, w, D)`` -> block ``i``'s sequence ``(B', N, D)`` in its token order."""
        video = grid.dim() == 5
        if self._frame_local(i, video):
            seq = grid.flatten(0, 1).flatten(1, 2)  # (B*T, h*w, D)
        elif video:
            seq = grid.flatten(1, 3)  # (B, T*h*w, D)
        else:
            seq = grid.flatten(1, 2)  # (B, h*w, D)
        if self.block_flips(i):
            if video and self.config.temporal_causal and not self._frame_local(i, video):
                t = grid.shape[1]
                seq = seq.unflatten(1, (t, -1)).flip(2).flatten(1, 2)  # reverse inside each frame
            else:
                seq = seq.flip(1)
        return seq

    def _from_sequence(self, seq: torch.Tensor, like: torch.Tensor, i: int) -> torch.Tensor:
        """Inverse of :meth:`_to_sequence` for a sequence shaped like block ``i``'s."""
        video = like.dim() == 5
        if self.block_flips(i):
            if video and self.config.temporal_causal and not self._frame_local(i, video):
                seq = seq.unflatten(1, (like.shape[1], -1)).flip(2).flatten(1, 2)
            else:
                seq = seq.flip(1)
        return seq.reshape(like.shape[:-1] + seq.shape[-1:])

    def block_rope(self, i: int, grid_shape: tuple[int, ...], txt_len: int) -> Rope | None:
        """RoPE rotation table ``(L + N, head_dim / 2, 2)`` for block ``i`` on a grid ``(B, [T,] h, w, D)``, or None."""
        if not self.config.rope:
            return None
        video = len(grid_shape) == 5
        t = grid_shape[1] if video and not self._frame_local(i, video) else 1
        h, w = grid_shape[-3], grid_shape[-2]
        three_axis = self.config.txt_size > 0 or video
        txt = txt_len if self.blocks[i].text_conditioned else 0
        return self._rope_table((t, h, w), txt, three_axis, self.blocks[-1].proj_in.weight.device)

    def _rope_table(self, grid: tuple[int, int, int], txt_len: int, three_axis: bool, device: torch.device) -> Rope:
        """:func:`rope_rotation` of :func:`rope_angles`, built once per layout and device (not in every step)."""
        key = (*grid, txt_len, three_axis, device)
        if key not in self._rope_tables:
            with torch.inference_mode(False):  # kept for training too: never an inference tensor (see _inference)
                angles = rope_angles(self.config.head_dim, grid, self.pos_scale, txt_len, three_axis)
                self._rope_tables[key] = rope_rotation(angles).to(device)
        return self._rope_tables[key]

    def _check_latents(self, x: torch.Tensor, what: str) -> None:
        """Refuse latents that are not float ``(B, C, H, W)``/``(B, [T,] C, H, W)`` with this model's channels and sides
        divisible by the patch size (a clear error instead of one deep in the first block, or a silent one)."""
        c, p = self.config.channel_size, self.patch_size
        if x.dim() not in (4, 5) or x.shape[-3] != c or x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"{what} {tuple(x.shape)}: this model takes (B, C, H, W) image or (B, T, C, H, W) video "
                             f"latents with C = {c} channels and H, W multiples of the patch size {p}")
        if not x.is_floating_point():
            raise TypeError(f"{what} is a {x.dtype} tensor: the flow takes float latents (pixel-space models: pixels "
                            "in [-1, 1], 8-bit values v as v / 127.5 - 1)")

    def _block_text(self, i: int, y: torch.Tensor | None, grid: torch.Tensor) -> torch.Tensor | None:
        if not self.blocks[i].text_conditioned:
            return None
        if y is None:
            raise ValueError("this model is text-conditioned: pass y (B, L, txt_dim) text embeddings")
        if self._frame_local(i, grid.dim() == 5):
            return y.repeat_interleave(grid.shape[1], dim=0)  # one text row per frame
        return y

    # ------------------------------------------------------------------ data -> noise
    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> FlowOutput:
        """Map data to noise through every block (training direction, SPEC section 4).

        Args:
            x: ``(B, C, H, W)`` image or ``(B, T, C, H, W)`` video latents (noised with ``noise_std``).
            y: ``(B, L, txt_dim)`` text embeddings, or None for a model without text.

        Returns:
            :class:`FlowOutput` with ``z`` in the layout of ``x``.

        Raises:
            ValueError: ``x`` of another layout, channel count or a side not divisible by the patch size; ``y``
                rows that differ from the batch; a text-conditioned model without ``y``.
            TypeError: ``x`` is not a float tensor.
        """
        self._check_latents(x, "x")
        if y is not None and y.shape[0] != x.shape[0]:
            raise ValueError(f"y has {y.shape[0]} rows for a batch of {x.shape[0]}: give one text embedding per sample")
        grid = patchify(x, self.patch_size)
        outputs, logdets = [grid], []
        txt_len = 0 if y is None else y.shape[1]
        for i, block in enumerate(self.blocks):
            seq = self._to_sequence(grid, i)
            z, logdet, _ = block(seq, self._block_text(i, y, grid), self.block_rope(i, grid.shape, txt_len))
            grid = self._from_sequence(z, grid, i)
            logdet = self._from_sequence(logdet, grid, i)  # (B, [T,] h, w, D)
            if self._frame_local(i, grid.dim() == 5):
                logdets.append(logdet.flatten(2, 3))  # (B, T, F, D)
            else:
                logdets.append(logdet.flatten(1, -2))  # (B, N, D)
            outputs.append(grid)
        return FlowOutput(unpatchify(grid, self.patch_size), logdets, outputs)

    def nll(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample loss ``0.5 mean(z^2) - sum_blocks mean(logdet)`` ``(B,)`` (nats/dim minus ``0.5 log 2pi``)."""
        loss_z, loss_logdet = self._nll_terms(self(x, y))
        return loss_z + loss_logdet

    @staticmethod
    def _nll_terms(out: FlowOutput) -> tuple[torch.Tensor, torch.Tensor]:
        b = out.z.shape[0]
        loss_z = 0.5 * out.z.reshape(b, -1).square().mean(1)
        loss_logdet = -sum(ld.reshape(b, -1).mean(1) for ld in out.logdets)
        return loss_z, loss_logdet

    def loss(self, x: torch.Tensor, y: torch.Tensor | None = None,
             weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Training loss (STARFlow Sec. 3.1; SPEC section 7).

        Args:
            x: noised latents ``(B, C, H, W)`` or ``(B, T, C, H, W)``.
            y: ``(B, L, txt_dim)`` text embeddings or None.
            weights: optional ``(B,)`` per-sample weights (normalised to mean 1).

        Returns:
            dict with scalar ``loss`` (what to minimise, including ``latent_norm_regularization``),
            ``loss_z``, ``loss_logdet``, ``nll`` (per-sample, ``(B,)``), ``bits_per_dim`` of the latents.
        """
        return self.loss_from_output(self(x, y), weights)

    def loss_from_output(self, out: FlowOutput, weights: torch.Tensor | None = None,
                         nll_weight: float = 1.0) -> dict[str, torch.Tensor]:
        """The :meth:`loss` dict from a :class:`FlowOutput` (e.g. one computed through a DDP wrapper);
        ``weights``: optional ``(B,)`` per-sample weights, normalised to mean 1, as in :meth:`loss`; ``nll_weight``:
        a factor of the likelihood term of ``loss`` alone, not of the regulariser (``cond_noise_level``'s
        ``noise_std / 0.3``, SPEC section 16; ``loss_z`` and ``loss_logdet`` stay unweighted)."""
        loss_z, loss_logdet = self._nll_terms(out)
        nll = loss_z + loss_logdet
        w = torch.ones_like(nll) if weights is None else weights / weights.mean()
        total = (nll * w).mean()
        if nll_weight != 1.0:
            total = total * nll_weight
        lam = self.config.latent_norm_regularization
        if lam > 0:
            total = total + lam * sum(o.float().square().mean() for o in out.outputs[1:-1])
        return {"loss": total, "loss_z": (loss_z * w).mean(), "loss_logdet": (loss_logdet * w).mean(),
                "nll": nll.detach(), "bits_per_dim": ((nll.detach().mean() + HALF_LOG_2PI) / math.log(2))}

    def denoiser(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Raw prediction ``D(x, y)`` of the learnable self-denoiser (STARFlow-V Sec. 3.3).

        Args:
            x: ``(B, T, C, H, W)`` (or ``(B, C, H, W)``) noisy latents.
            y: ``(B, L, txt_dim)`` text embeddings (used by a conditional denoiser).

        Returns:
            Prediction of ``noise_std * dNLL/dx``, same shape as ``x``.

        Raises:
            RuntimeError: the config has no ``learnable_self_denoiser``.
            ValueError: a conditional denoiser (``conditional_denoiser``) called without ``y``.
        """
        if self.learnable_self_denoiser is None:
            raise RuntimeError("this model has no learnable denoiser (config learnable_self_denoiser: 0)")
        video = x.dim() == 5
        grid = patchify(x if video else x[:, None], self.patch_size)  # (B, T, h, w, D)
        conditional = self.learnable_self_denoiser.proj_txt is not None
        txt_len = y.shape[1] if conditional and y is not None else 0
        rope = None
        if self.config.rope:
            rope = self._rope_table(tuple(grid.shape[1:4]), txt_len, True, x.device)
        out = self.learnable_self_denoiser(grid.flatten(1, 3), y, rope, grid.shape[1])
        out = unpatchify(out.reshape(grid.shape), self.patch_size)
        return out if video else out[:, 0]

    # ------------------------------------------------------------------ noise -> data
    @_inference
    def reverse(self, noise: torch.Tensor, y: torch.Tensor | None = None, guidance: float = 0.0,
                jacobi: bool = False, jacobi_block_size: int | str = JACOBI_BLOCK_SIZE,
                jacobi_th: float = JACOBI_THRESHOLD, jacobi_max_iter: int = JACOBI_MAX_ITER, context=None, anneal_guidance: bool = False,
                stats: DecodeStats | None = None, jacobi_stop: str = "batch",
                rank_sync: RankSync | None = None, window: int | None = None, context_frames: int | None = None,
                y_extend: torch.Tensor | None = None,
                timer: Callable[[str], ContextManager] | None = None, known: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, intermediates: list[torch.Tensor] | None = None,
                guide_top: int | None = None, attn_temp: float = 1.0,
                jacobi_auto_batch: int | None = None) -> torch.Tensor:
        """Sample: map noise to data, deep block first (SPEC sections 8 and 9).

        Args:
            noise: ``(B, C, H, W)`` or ``(B, T, C, H, W)`` standard normal noise.
            y: text embeddings; with ``guidance > 0`` ``(2B, L, txt_dim)`` rows ``[cond; uncond]``
               (with ``guidance == 0`` extra uncond rows are ignored); None for a model without text.
            guidance: classifier-free guidance weight w.
            jacobi: block-wise Jacobi iteration instead of sequential decoding.
            jacobi_block_size, jacobi_th, jacobi_max_iter: chunk size (or ``"auto"``, see
                :func:`starflow.models.jacobi.auto_block_size`), stopping threshold, iteration cap.
            context: image-to-video prefix from :meth:`encode_context` (video models).
            anneal_guidance: weight ``w (t + 1) / N`` at token t.
            stats: optional counters of sequential model evaluations.
            jacobi_stop: ``"batch"`` (official rule: change over the whole batch) or ``"sample"`` (each sample
                stops on its own and is frozen: results independent of the batch; see
                :mod:`starflow.models.jacobi`).
            rank_sync: with ``"sample"`` over several ranks, a reduction of a flag over them
                (:func:`starflow.distributed.any_rank`): iterate until every rank is done (for sharded weights,
                where all ranks must evaluate each layer equally often).
            window: video: latent frames the model was trained on, W. Longer noise is sampled window by window
                (SPEC section 11): once a window is full, each block that spans frames starts a new KV cache,
                re-encodes the text and the last ``context_frames`` frames at positions restarting from 0, and
                samples the next ``W - context_frames`` frames.
            context_frames: frames carried into each new window (``1 <= C < W``).
            y_extend: text for the continuation windows (e.g. the caption with the ``(extend) `` prefix);
                default ``y``.
            timer: optional ``timer(name)`` context manager wrapped around each block's decoding, named by
                :meth:`block_name` (``starflow sample --profile``).
            known: training-free inpainting (SPEC section 17): latents in the layout of ``noise``, already carrying
                the training noise (``x~ = x + noise_std * eps``), known outside ``mask``. They are mapped to noise
                with the conditional text (rows ``[:B]`` of ``y``), keeping every block's input activations;
                sampling starts from ``(1 - m) f(x~) + m noise`` and, inside every block, each known token's
                decoded value is replaced by its known activation (teacher forcing), so later tokens attend to
                the exact known data at every level. Known tokens of the result equal ``known`` exactly.
            mask: ``(B, [T,] h, w)`` on the token grid (``h = H / patch_size``), True/1 = generate; required with
                ``known``. Pixel masks are max-pooled to the grid by the caller
                (:meth:`starflow.sampling.Pipeline.inpaint`).
            intermediates: a list that receives the latents ``(B, [T,] C, H, W)`` after each block is inverted,
                deep block first (the last entry is the result).
            guide_top: guide only the first ``guide_top`` blocks in sampling order (the deep block is the first);
                later blocks run unguided on the conditional rows. None = every text-conditioned block.
            attn_temp: attention temperature of the unconditional guidance rows (see
                :func:`starflow.models.jacobi.decode_block`); 1 = plain guidance.
            jacobi_auto_batch: with ``jacobi_block_size="auto"``: the batch the block size is chosen for (e.g. the
                job's ``--sample_batch_size``), so a job's smaller last batch decodes as its full ones; None = B.

        Returns:
            Samples in the layout of ``noise`` (float32), still carrying the training noise
            (see :func:`starflow.sampling.self_denoise`). The decoding runs under ``torch.inference_mode``; the
            samples and ``intermediates`` are ordinary tensors (see :func:`_inference`).

        Raises:
            ValueError: noise of another layout or channel count, or a side not divisible by the patch size; text
                rows do not match the batch, or a text-conditioned model without ``y``; ``known`` without ``mask`` or
                of another shape, or combined with a video ``context`` or windowed sampling; ``guide_top < 0``,
                ``attn_temp <= 0`` or ``jacobi_auto_batch < 1``; ``jacobi_stop="batch"`` with a ``rank_sync``;
                windowed sampling without ``1 <= context_frames < window``; a video prefix through a flipped block
                of a model without ``temporal_causal``.
        """
        self._check_latents(noise, "noise")
        if guide_top is not None and guide_top < 0:
            raise ValueError(f"guide_top {guide_top}: the number of guided blocks must be >= 0")
        if not attn_temp > 0:
            raise ValueError(f"attn_temp {attn_temp}: the attention temperature must be > 0")
        b = noise.shape[0]
        if jacobi_auto_batch is not None and jacobi_auto_batch < 1:
            raise ValueError(f"jacobi_auto_batch {jacobi_auto_batch}: the batch the auto block size is chosen for "
                             "must be >= 1")
        if jacobi and jacobi_stop == "batch" and rank_sync is not None:
            raise ValueError("jacobi_stop 'batch' stops each rank on its own batch, but sharded weights need every rank "
                             "to iterate as often as the others: use jacobi_stop 'sample' (--jacobi_stop sample)")
        settings = JacobiSettings(jacobi, jacobi_block_size, jacobi_th, jacobi_max_iter, jacobi_stop, rank_sync,
                                  auto_scale=1.0 if jacobi_auto_batch is None else jacobi_auto_batch / b)
        y = self._guidance_rows(y, b, guidance)
        y_extend = y if y_extend is None else self._guidance_rows(y_extend, b, guidance)
        grid = patchify(noise.float(), self.patch_size)
        if context is not None and (noise.dim() != 5 or context.frames >= noise.shape[1]):
            raise ValueError(f"a context of {context.frames} frame(s) needs video noise (B, T, C, H, W) with more "
                             f"frames, got {tuple(noise.shape)}")
        txt_len = 0 if y is None else y.shape[1]
        known_grids = mask_grid = None
        if known is not None or mask is not None:
            known_grids, mask_grid = self._known_activations(known, mask, y, b, grid, context, window)
            grid = torch.where(mask_grid, grid, known_grids[-1])  # z = (1 - m) f(x~) + m noise
        for order, i in enumerate(reversed(range(self.num_blocks))):
            prefix = None if context is None else context.grids[i]
            forced = None if known_grids is None else (known_grids[i], mask_grid)
            w_i, y_i, y_ext_i = guidance, y, y_extend
            if guidance > 0 and guide_top is not None and order >= guide_top:  # unguided: the conditional rows
                w_i, y_i, y_ext_i = 0.0, None if y is None else y[:b], None if y_extend is None else y_extend[:b]
            with timer(self.block_name(i)) if timer is not None else contextlib.nullcontext():
                grid = self.reverse_block(i, grid, y_i, w_i, settings, txt_len, anneal_guidance, stats,
                                          prefix=prefix, window=window, context_frames=context_frames,
                                          y_extend=y_ext_i, known=forced, attn_temp=attn_temp)
            if intermediates is not None:
                intermediates.append(unpatchify(grid, self.patch_size))
        return unpatchify(grid, self.patch_size)

    def _known_activations(self, known: torch.Tensor | None, mask: torch.Tensor | None, y: torch.Tensor | None,
                           b: int, grid: torch.Tensor, context, window: int | None):
        """Every block's input grid for the known latents and the token mask ``(B, [T,] h, w, 1)`` (True = generate)."""
        if known is None or mask is None:
            raise ValueError("inpainting needs both known (noised latents) and mask (token grid, 1 = generate)")
        if tuple(known.shape) != tuple(unpatchify(grid, self.patch_size).shape):
            raise ValueError(f"known latents {tuple(known.shape)} must have the noise's shape "
                             f"{tuple(unpatchify(grid, self.patch_size).shape)}")
        if context is not None or (window is not None and grid.dim() == 5 and grid.shape[1] > window):
            raise ValueError("inpainting (known, mask) works on one window without a video context prefix: sample "
                             f"at most {window} latent frames and pass the known frames through the mask instead")
        mask = mask.to(device=grid.device)
        if mask.dim() == grid.dim() - 2:
            mask = mask.expand(b, *mask.shape)
        if tuple(mask.shape) != tuple(grid.shape[:-1]):
            raise ValueError(f"mask {tuple(mask.shape)} must be on the token grid {tuple(grid.shape[:-1])} "
                             f"(latent size / patch_size {self.patch_size}); max-pool pixel masks to it")
        y_cond = None if y is None else y[:b]
        out = self(known.float().to(grid.device), y_cond)
        return out.outputs, mask.bool()[..., None]

    @torch.no_grad()
    def encode_context(self, x_prefix: torch.Tensor, y: torch.Tensor | None = None) -> "VideoContext":
        """Run known leading frames through the flow (data -> noise) for image-to-video (SPEC section 11).

        Args:
            x_prefix: ``(B, P, C, H, W)`` noisy latents of the first ``P`` frames (an image: ``P = 1``, or a
                ``(B, C, H, W)`` tensor), already carrying the training noise (``noise_std``).
            y: text embeddings ``(B, L, txt_dim)`` or the guidance rows ``(2B, ...)`` (the first ``B`` are used).

        Returns:
            A :class:`VideoContext` for :meth:`reverse` (``context=``): every flow block's input for the
            prefix frames. ``reverse`` then fills each block's KV cache with them (guidance rows duplicated),
            samples the remaining frames, and returns the prefix unchanged as the first frames.

        Raises:
            ValueError: ``y`` is None for a text-conditioned model.
        """
        if x_prefix.dim() == 4:
            x_prefix = x_prefix[:, None]
        b = x_prefix.shape[0]
        if y is not None and y.shape[0] == 2 * b:
            y = y[:b]
        out = self(x_prefix.float(), y if self.txt_dim is not None else None)
        return VideoContext(out.outputs[:-1], x_prefix.shape[1])

    def _guidance_rows(self, y: torch.Tensor | None, b: int, guidance: float) -> torch.Tensor | None:
        if self.txt_dim is None:
            return None
        if y is None:
            raise ValueError("this model is text-conditioned: pass y text embeddings")
        if guidance > 0 and y.shape[0] != 2 * b:
            raise ValueError(f"guidance > 0 needs y with 2B = {2 * b} rows [cond; uncond], got {y.shape[0]}")
        if y.shape[0] not in (b, 2 * b):
            raise ValueError(f"y has {y.shape[0]} rows for a batch of {b}")
        return y if guidance > 0 else y[:b]

    def reverse_block(self, i: int, grid: torch.Tensor, y: torch.Tensor | None, guidance: float,
                      settings: JacobiSettings, txt_len: int, anneal_guidance: bool = False,
                      stats: DecodeStats | None = None, cache=None, prefix: torch.Tensor | None = None,
                      window: int | None = None, context_frames: int | None = None,
                      y_extend: torch.Tensor | None = None,
                      known: tuple[torch.Tensor, torch.Tensor] | None = None, attn_temp: float = 1.0) -> torch.Tensor:
        """Invert block ``i`` on a token grid ``(B, [T,] h, w, D)``; returns the grid before the block.

        ``prefix`` ``(B, P, h, w, D)``: known inputs of the first ``P`` frames (returned unchanged). ``window``
        / ``context_frames``: sliding-window sampling of videos longer than ``window`` frames (see :meth:`reverse`).
        ``known``: ``(values, mask)``, the block's known input grid and the token mask ``(B, [T,] h, w, 1)``
        (True = generate) for teacher-forced inpainting (see :meth:`reverse`). ``attn_temp``: attention temperature of
        the unconditional guidance rows.

        Raises:
            ValueError: windowed sampling without ``1 <= context_frames < window``, and the checks of :meth:`reverse`
                that concern one block.
        """
        block = self.blocks[i]
        n_prefix = 0 if prefix is None else prefix.shape[1]
        video = grid.dim() == 5
        if isinstance(block, IdentityBlock):
            rest = grid[:, n_prefix:]
            if known is not None:
                rest = torch.where(known[1], rest, known[0].to(rest.dtype))
            return rest if prefix is None else torch.cat([prefix.to(rest.dtype), rest], dim=1)
        if self._frame_local(i, video):
            rest = self._reverse_sequence(i, grid[:, n_prefix:], y, guidance, settings, txt_len, anneal_guidance,
                                          stats, cache, known=known, attn_temp=attn_temp)
            return rest if prefix is None else torch.cat([prefix.to(rest.dtype), rest], dim=1)
        frames = grid.shape[1] if video else 1
        if window is None or frames <= window:
            return self._reverse_sequence(i, grid, y, guidance, settings, txt_len, anneal_guidance, stats, cache, prefix,
                                          known=known, attn_temp=attn_temp)
        c = context_frames
        if c is None or not 1 <= c < window:
            raise ValueError(f"sampling {frames} frames with a window of {window} needs 1 <= context_frames < {window}, got {c}")
        out = grid.clone()
        out[:, :window] = self._reverse_sequence(i, grid[:, :window], y, guidance, settings, txt_len, anneal_guidance,
                                                 stats, None, prefix, attn_temp=attn_temp)
        end = window
        while end < frames:
            n = min(window - c, frames - end)
            ctx = out[:, end - c : end]
            seg = torch.cat([ctx, grid[:, end : end + n]], dim=1)  # positions restart at the window start
            out[:, end : end + n] = self._reverse_sequence(i, seg, y_extend if y_extend is not None else y, guidance,
                                                           settings, txt_len, anneal_guidance, stats, None, ctx,
                                                           attn_temp=attn_temp)[:, c:]
            end += n
        return out

    def _reverse_sequence(self, i: int, grid: torch.Tensor, y: torch.Tensor | None, guidance: float,
                          settings: JacobiSettings, txt_len: int, anneal_guidance: bool, stats: DecodeStats | None,
                          cache=None, prefix: torch.Tensor | None = None,
                          known: tuple[torch.Tensor, torch.Tensor] | None = None, attn_temp: float = 1.0) -> torch.Tensor:
        """Decode block ``i`` over its whole token sequence (one window), after an optional known prefix, with
        optional teacher-forced known tokens ``(values, mask)``."""
        block = self.blocks[i]
        seq = self._to_sequence(grid, i)
        y_i = self._block_text(i, y, grid) if block.text_conditioned else None
        guided = guidance > 0 and y_i is not None
        pre = None
        if prefix is not None:
            if self.block_flips(i) and not self.config.temporal_causal:
                raise ValueError("a video prefix needs temporal_causal > 0 (flipped blocks must keep frame order)")
            pre = self._to_sequence(prefix.to(grid.dtype), i)
        forced = forced_mask = None
        if known is not None:  # mask True = generate; decode_block takes True = known
            forced = self._to_sequence(known[0].to(grid.dtype), i)
            forced_mask = ~self._to_sequence(known[1].expand(*grid.shape[:-1], 1), i)
        if guided:
            seq = torch.cat([seq, seq])  # guidance rows [cond; uncond]
            pre = None if pre is None else torch.cat([pre, pre])
            if forced is not None:
                forced, forced_mask = torch.cat([forced, forced]), torch.cat([forced_mask, forced_mask])
        video = grid.dim() == 5 and not self._frame_local(i, True) and grid.shape[1] > 1
        frame_tokens = grid.shape[-3] * grid.shape[-2] if video else None
        with gathered(block):  # a no-op unless the weights are sharded (FSDP2)
            x = decode_block(block, seq, y_i, self.block_rope(i, grid.shape, txt_len), guidance=guidance,
                             jacobi=settings, anneal_guidance=anneal_guidance, cache=cache, stats=stats,
                             frame_tokens=frame_tokens, prefix=pre, known=forced, known_mask=forced_mask,
                             attn_temp=attn_temp)
        if guided:
            x = x[: x.shape[0] // 2]
        return self._from_sequence(x, grid, i)


@dataclass
class VideoContext:
    """Known leading frames for image-to-video and video continuation (from :meth:`STARFlow.encode_context`).

    Attributes:
        grids: per flow block ``i``, its input token grid for the known frames ``(B, P, h, w, D)``.
        frames: ``P``, the number of known latent frames.
    """

    grids: list[torch.Tensor]
    frames: int
