"""Everything a training run needs, built from its config: frozen components, data, model, :class:`Trainer`."""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from starflow.adapters import LabelEncoder, TextEncoder, build_text_encoder, build_vae
from starflow.assets import TINY_TEXT_ENCODER
from starflow.config import Config
from starflow.data import build_dataset, build_secondary_dataset
from starflow.data.build import check_data_folder
from starflow.distributed import DistInfo, from_rank0
from starflow.models import STARFlow
from starflow.train.init_from import check_lora_base, covers_every_parameter, init_from
from starflow.train.memory import retain_freed_memory
from starflow.models.lora import apply_lora
from starflow.train.trainer import Trainer

__all__ = ["build_trainer", "NO_DATA"]

NO_DATA = ("no training data: pass --data FOLDER (an image folder with metadata.jsonl; "
           "`python scripts/prepare_digits.py` makes one)")


def build_trainer(cfg: Config, dist: DistInfo, config_dir: Path | str | None = None) -> Trainer:
    """VAE, text encoder, dataset, model and trainer of a run.

    The model's initial weights come from ``cfg.seed`` and are identical on every rank; the global RNG of
    rank ``r`` is then seeded with ``cfg.seed + r``. A fine-tune whose ``init_from`` holds every parameter
    builds the model on the meta device: the trainer allocates it (sharded under FSDP2) and the weights are
    loaded into it, with no random initialisation and no full copy per rank. With ``lora_rank`` the base weights are loaded from
    ``init_from`` here (every start, resumed or not: checkpoints hold only the adapters) and the adapters are
    injected before the model is sharded.

    Args:
        cfg: the resolved training config (``data`` set).
        dist: this process's rank and device (:func:`starflow.distributed.init_distributed`).
        config_dir: folder against which the config's relative ``text``/``vae`` paths resolve.

    Raises:
        ValueError: no ``data`` in the config, or data that does not fit the config.
        FileNotFoundError: data, text encoder or VAE not found.
    """
    if cfg.data is None:
        raise ValueError(NO_DATA)
    check_data_folder(cfg.data)  # before the text encoder and VAE load (minutes for the released ones)
    torch.manual_seed(cfg.seed + dist.rank)
    if dist.device.type == "cpu" and cfg.malloc_retain:
        retain_freed_memory()
    vae = build_vae(cfg, config_dir, device=dist.device)
    text_encoder = build_text_encoder(cfg, config_dir, device=dist.device)
    check_base_text_encoder(cfg, text_encoder)
    # rank 0 decides the kind of data and indexes a folder for all ranks
    dataset = build_dataset(cfg, downsample=vae.downsample, rank=dist.rank, world_size=dist.world_size,
                            once=from_rank0)
    secondary = build_secondary_dataset(cfg, downsample=vae.downsample, once=from_rank0)
    if isinstance(text_encoder, LabelEncoder) and hasattr(dataset, "texts"):
        text_encoder.ids(list(dataset.texts))  # every caption must be a class name (raises, naming the others)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    txt_dim = text_encoder.hidden_size if text_encoder else None
    with torch.device("meta"):
        model = STARFlow.from_config(cfg, txt_dim=txt_dim, vae_downsample=vae.downsample)
    if not (cfg.init_from and not cfg.lora_rank and covers_every_parameter(model, cfg.init_from)):
        model = STARFlow.from_config(cfg, txt_dim=txt_dim, vae_downsample=vae.downsample).to(dist.device)
    elif dist.is_main:  # every weight comes from init_from: no random initialisation, no full copy per rank
        tqdm.write(f"the model is built on the meta device; its weights come from {cfg.init_from}, or from the "
                   "run's own checkpoint when it resumes")
    if cfg.lora_rank:  # LoRA: base weights first (checkpoints hold only the adapters), then the adapters
        if cfg.init_from:
            report = init_from(model, cfg.init_from)
            if dist.is_main:
                tqdm.write(report.table())
            check_lora_base(report)
        trainable = apply_lora(model, cfg)
        if dist.is_main:
            total = sum(p.numel() for p in model.parameters())
            tqdm.write(f"LoRA rank {cfg.lora_rank}, alpha {cfg.lora_alpha:g}: training {trainable:,} of {total:,} "
                       f"parameters ({100 * trainable / total:.2f}%)")
    torch.manual_seed(cfg.seed + dist.rank)
    return Trainer(cfg, dist, model, text_encoder, vae, dataset, Path(cfg.logdir), secondary=secondary)


def check_base_text_encoder(cfg: Config, text_encoder) -> None:
    """Refuse a fine-tune whose built-in tiny T5 (drawn from the run's ``seed``) is not the text encoder its
    ``init_from`` model folder was trained with (``text_encoder/`` beside its weights): the flow would be trained
    on other text features than it learned.

    Raises:
        ValueError: the two encoders differ (the message gives the flag that uses the base's).
    """
    if cfg.text != TINY_TEXT_ENCODER or not cfg.init_from:
        return
    base = Path(cfg.init_from)
    folder = (base if base.is_dir() else base.parent) / "text_encoder"
    if not folder.is_dir():
        return
    probe = ["a handwritten digit 3", ""]
    with torch.no_grad():
        theirs = TextEncoder.from_pretrained(str(folder), max_length=cfg.txt_size)(probe)
        ours = text_encoder(probe).to(theirs.device)
    if theirs.shape != ours.shape or not torch.allclose(theirs, ours):
        raise ValueError(f"init_from {cfg.init_from} was trained with the text encoder in {folder}, and this run's "
                         f"built-in tiny T5 (drawn from seed {cfg.seed}) is another one: pass --text {folder} to "
                         "fine-tune with it (or the seed its run used)")
