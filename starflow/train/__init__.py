"""Training: build a run from a config (:func:`build_trainer`), fit it (:meth:`Trainer.fit`), export a model folder.

From Python, as ``starflow train`` does::

    from starflow.config import load_config
    from starflow.distributed import init_distributed
    from starflow.train import build_trainer

    cfg = load_config("configs/demo_digits.yaml", {"data": "data/digits/train", "logdir": "runs/nb"})
    trainer = build_trainer(cfg, init_distributed("cpu"), "configs")
    trainer.resume()            # optional: continue from the logdir's latest checkpoint
    history = trainer.fit()     # loads init_from first, unless resumed; per-step metrics
    trainer.export("runs/nb/model")
"""
from starflow.train.ema import EMA
from starflow.train.export import export_checkpoint, load_checkpoint_model
from starflow.train.launch import build_trainer
from starflow.train.trainer import Trainer, TrainingDiverged, TrainingStopped

__all__ = ["build_trainer", "Trainer", "TrainingDiverged", "TrainingStopped", "EMA", "export_checkpoint",
           "load_checkpoint_model"]
