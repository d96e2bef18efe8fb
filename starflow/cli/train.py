"""``starflow train``: one process, or many under ``torchrun`` (FSDP2 / DDP)."""
from __future__ import annotations

import argparse
from pathlib import Path

from starflow.cli._flags import add_config_flags, add_device_flag, config_overrides, note_once, say_error
from starflow.config import check_inactive, load_config
from starflow.files import check_writable

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``train`` to the subcommands."""
    p = sub.add_parser("train", help="train a STARFlow (single process or under torchrun)",
                       description="Train on an image or video folder with metadata.jsonl, webdataset shards (wds 1) or a "
                                   "latent cache. Resumes from the latest checkpoint in --logdir unless --no-resume.")
    p.add_argument("--config", required=True, help="YAML config (official format or plain mapping)")
    p.add_argument("--dry_run", action="store_true",
                   help="build everything, resume from the logdir's latest checkpoint as a real run would (and "
                        "refuse what it would refuse), run one step, write nothing, exit")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from the latest checkpoint in logdir [default: on]")
    p.add_argument("--resume_path", default=None, metavar="PATH",
                   help="official name of --init_from: start from these weights (optimizer and step fresh)")
    add_device_flag(p)
    add_config_flags(p)
    p.set_defaults(func=run)


def check_logdir_run(cfg, resume: bool) -> None:
    """Refuse, before anything is built or written, a start that would mix with or ignore the run already in
    ``logdir``: ``--no-resume`` where checkpoints exist (the new run's would be pruned among the old, and a later
    restart would resume the old run), and a resume whose checkpoint is already past ``steps``.

    Raises:
        ValueError: either case, with the fix.
    """
    from starflow.train.state import CheckpointManager, read_meta

    if not cfg.logdir:
        return
    latest = CheckpointManager(Path(cfg.logdir) / "checkpoints", cfg.keep_last).latest()
    if latest is None:
        return
    step = read_meta(latest).get("step", 0)
    if not resume:
        raise ValueError(f"--no-resume: {cfg.logdir} holds the checkpoints of another run (latest {latest.name}): "
                         "a new run there would be pruned among them and a restart would resume the old one; pass a "
                         f"new --logdir, or delete {latest.parent} first")
    if step > cfg.steps:
        raise ValueError(f"the run in {cfg.logdir} is at step {step}, past --steps {cfg.steps}: raise --steps to train "
                         "it further, or pass a new --logdir for a shorter run")


def run(args: argparse.Namespace) -> int:
    """Build the run (:func:`starflow.train.launch.build_trainer`), resume, fit, export ``logdir/model``."""
    from starflow.distributed import init_distributed
    from starflow.folder_lock import FolderLock
    from starflow.train.launch import NO_DATA
    from starflow.assets import absolute_local_asset
    from starflow.train.trainer import check_training

    if args.resume_path is not None:
        if args.init_from is not None:
            raise ValueError("--resume_path is the official name of --init_from: pass one of them")
        args.init_from = args.resume_path
    cfg = load_config(args.config, config_overrides(args))
    if cfg.init_from and Path(cfg.init_from).exists() and not Path(cfg.init_from).is_absolute():
        # recorded absolute: resumes, LoRA runs (which reload their base) and export --merge_lora run from anywhere
        cfg = load_config(cfg, {"init_from": str(Path(cfg.init_from).resolve())})
    local = {key: absolute_local_asset(getattr(cfg, key), Path(args.config).parent) for key in ("text", "vae")}
    if any(value != getattr(cfg, key) for key, value in local.items()):  # a local T5, vocabulary or VAE: the same
        cfg = load_config(cfg, local)
    check_training(cfg)
    check_inactive(cfg, config_overrides(args), note_once)  # (flags refused; the file's noted)
    if cfg.data is None:
        raise SystemExit(NO_DATA)
    if cfg.logdir and Path(cfg.logdir).exists() and not Path(cfg.logdir).is_dir():
        raise ValueError(f"--logdir {cfg.logdir}: is a file; pass a folder for the run (checkpoints, metrics, model)")
    if cfg.logdir:  # a folder under a file cannot be made: said now, before the data and the model are loaded
        above = next(p for p in Path(cfg.logdir).parents if p.exists())
        if not above.is_dir():
            raise ValueError(f"--logdir {cfg.logdir}: {above} is a file, so the folder cannot be made; pass another "
                             "folder for the run")
        check_writable(cfg.logdir, "--logdir")
    check_logdir_run(cfg, args.resume)  # (a dry run refuses what the run would)
    dist = init_distributed(args.device)
    lock = None
    if cfg.logdir and dist.is_main and not args.dry_run and Path(cfg.logdir).is_dir():
        # one run per logdir, said before the data and the model load; held until the model folder is written
        lock = FolderLock(cfg.logdir, "training logdir", " (or pass another --logdir)").acquire()
    try:
        return _train(args, cfg, dist)
    finally:
        if lock is not None:
            lock.release()


def _train(args: argparse.Namespace, cfg, dist) -> int:
    """Everything of :func:`run` after the checks: build, resume, fit, export."""
    import torch

    from starflow.distributed import cleanup_distributed
    from starflow.train.launch import build_trainer
    from starflow.train.trainer import TrainingDiverged

    trainer = build_trainer(cfg, dist, Path(args.config).parent)
    if dist.is_main:
        n = sum(p.numel() for p in trainer.model.parameters())
        dataset = trainer.dataset
        size = f"{len(dataset)} training {'videos' if cfg.is_video else 'images'}" if hasattr(dataset, "__len__") \
            else f"{dataset.num_samples} samples in {len(dataset.shards)} shards in {cfg.data}"
        precision = "bf16" if trainer.compute_dtype == torch.bfloat16 else "fp32"
        sharding = [k for k in ("fsdp", "fsdp_text_encoder") if getattr(cfg, k)]
        parallel = ("FSDP2" if trainer.sharded else "DDP" if dist.distributed else
                    f"unsharded: {' and '.join(f'{k} 1' for k in sharding)} shard under torchrun" if sharding else "")
        parallel = f" ({parallel})" if parallel else ""
        print(f"STARFlow: {n:,} parameters, {size}, {dist.world_size} process(es){parallel} on {dist.device} in "
              f"{precision}; logdir {cfg.logdir}")
    unused = [k for k in ("secondary_img_size", "secondary_batch_size") if getattr(cfg, k) is not None]
    if dist.is_main and unused and cfg.secondary_ratio == 0:
        print(f"note: {' and '.join(unused)} unused: secondary_ratio is 0 (no secondary image steps)")
    if dist.is_main and cfg.warmup_steps >= cfg.steps:
        print(f"note: warmup_steps {cfg.warmup_steps} >= steps {cfg.steps}: the learning rate never reaches lr "
              f"{cfg.lr:g}")
    if dist.is_main and cfg.ema > 0 and cfg.ema_start >= cfg.steps:
        print(f"note: ema_start {cfg.ema_start} >= steps {cfg.steps}: the moving average never starts, and "
              "ema.safetensors will hold the trained weights themselves")
    if dist.is_main and cfg.learnable_self_denoiser and not cfg.is_video and not cfg.lora_rank:
        print("note: learnable_self_denoiser trains a denoiser that image sampling does not use (images denoise with "
              "the Tweedie step; the learned one acts on video models, SPEC section 10)")
    resumed = args.resume and trainer.resume()  # (a dry run too: it checks the checkpoint a real run resumes from)
    if resumed and trainer.step >= cfg.steps and dist.is_main:
        print(f"the run in {cfg.logdir} is at step {trainer.step} of --steps {cfg.steps}: nothing to train (raise "
              "--steps to go on); " + ("the run would write its model folder again; this dry run checks one step"
                                       if args.dry_run else "its model folder is written again"))
    if resumed and cfg.init_from and not trainer.lora and dist.is_main:
        print(f"note: init_from {cfg.init_from} is not loaded: the run resumes from its own checkpoint, which holds "
              "the weights trained since")
    diverged = False
    try:
        history = trainer.fit(dry_run=args.dry_run)
    except TrainingDiverged as e:
        say_error(f"error: {e}")  # (rank 0 prints it; under torchrun every rank records it for the launcher's summary)
        diverged = True  # the teardown follows outside the handler: its traceback holds the trainer
    if diverged:
        del trainer  # the sharded model goes before its process group (cleanup_distributed)
        cleanup_distributed()
        return 3
    if args.dry_run:
        m = history[-1]
        if dist.is_main:
            print(f"dry run OK: one step, loss {m['loss']:.4f}, bits/dim {m['bits_per_dim']:.4f}, "
                  f"grad norm {m['grad_norm']:.3g}")
    else:
        folder = trainer.export(Path(cfg.logdir) / "model")
        if folder is not None:
            print(f"model folder written to {folder} (sample with: starflow sample --checkpoint_path {folder})")
    del trainer
    cleanup_distributed()
    return 0
