"""The text the released models were trained on: caption tags and the prompt template (SPEC sections 11, 12, 16).

Every prompt, the empty unconditional one included, goes through :func:`prompt_from_config` before the text
encoder: in training, latent caching and sampling alike. Caption tags are prepended to the caption before
templating.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from starflow.config import Config

__all__ = ["EXTEND_PREFIX", "V2V_PREFIX", "LAST_FRAME_PREFIX", "apply_prompt_template", "prompt_from_config"]

EXTEND_PREFIX = "(extend) "
"""Caption tag of video continuation (``drop_image`` training, continuation windows; SPEC section 11)."""
V2V_PREFIX = "(v2v) "
"""Caption tag of ``video_to_video`` models: source clip in, target clip out (SPEC sections 16, 17)."""
LAST_FRAME_PREFIX = "(last) "
"""Caption tag of ``last_frame_cond`` models: the end frame is a one-latent-frame prefix (SPEC sections 16, 17)."""


def apply_prompt_template(
    text: str,
    *,
    fps: int | None = None,
    fps_cond: bool = False,
    cond_noise_level: bool = False,
    noise_std: float = 0.0,
    mix_aspect: bool = False,
    aspect_ratio: str = "1:1",
) -> str:
    """Wrap a prompt the way the released models were trained (SPEC Sec. 12).

    Applied to every prompt, the empty unconditional one included, in this order:
    fps/image prefix, noise-level prefix, aspect-ratio suffix.

    Args:
        text: The raw prompt ("" for the unconditional branch of guidance).
        fps: Frames per second of a video; None or 0 means an image.
        fps_cond: Config ``fps_cond``: prefix ``"A video with {fps} fps:"`` or ``"An image:"``.
        cond_noise_level: Config ``cond_noise_level``: prefix the training noise level.
        noise_std: Config ``noise_std`` in normalised-latent units; written as ``int(noise_std * 1000)``.
        mix_aspect: Config ``mix_aspect``: append the aspect ratio.
        aspect_ratio: ``"w:h"``, e.g. ``"16:9"``.

    Returns:
        The templated prompt.
    """
    if fps_cond:
        text = f"A video with {fps} fps:\n{text}\n" if fps and fps > 0 else f"An image:\n{text}\n"
    if cond_noise_level:
        text = f"Noise Level {int(noise_std * 1000)}:\n{text}"
    if mix_aspect:
        text = f"{text}\n in a {aspect_ratio} aspect ratio.\n"
    return text


def prompt_from_config(text: str, cfg: "Config", aspect_ratio: str = "1:1", fps: int | None = None,
                       noise_std: float | None = None) -> str:
    """:func:`apply_prompt_template` with a config's switches: the one template call of training, latent
    caching and sampling.

    Args:
        text: the raw prompt ("" for the unconditional one), tags such as :data:`EXTEND_PREFIX` included.
        cfg: the model's config (``fps_cond``, ``cond_noise_level``, ``noise_std``, ``mix_aspect``).
        aspect_ratio: ``"w:h"`` of the sample.
        fps: the clip's frame rate [default: the config's ``vid_size`` fps, 0 for image configs].
        noise_std: the noise level a ``cond_noise_level`` prompt announces [default: the config's ``noise_std``].
    """
    if fps is None:
        fps = cfg.fps
    return apply_prompt_template(text, fps=fps, fps_cond=cfg.fps_cond, cond_noise_level=cfg.cond_noise_level,
                                 noise_std=cfg.noise_std if noise_std is None else noise_std,
                                 mix_aspect=cfg.mix_aspect, aspect_ratio=aspect_ratio)
