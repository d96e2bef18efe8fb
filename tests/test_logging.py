"""MetricsLogger: JSON lines always, TensorBoard when installed, W&B with a key (faked here), nothing when disabled."""
from __future__ import annotations

import json
import sys
import time
import types
import warnings
from pathlib import Path

import pytest
import torch

import starflow.train.logging as metrics_logging
from starflow.train.logging import MetricsLogger

CONFIG = {"lr": 1e-4, "layers_per_block": [1, 1, 2]}


@pytest.fixture(autouse=True)
def no_wandb_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests start without a W&B key and with the missing-wandb warning not yet shown."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.setattr(metrics_logging, "_warned_missing_wandb", False)


@pytest.fixture
def no_tensorboard(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` now raises ImportError


@pytest.fixture
def fake_wandb(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """A stand-in ``wandb`` module recording ``init``, ``log`` and ``finish`` calls."""
    calls = types.SimpleNamespace(init=[], log=[], finish=0)

    class Run:
        def log(self, data: dict, step: int) -> None:
            calls.log.append((dict(data), step))

        def finish(self) -> None:
            calls.finish += 1

    def init(**kwargs) -> Run:
        calls.init.append(kwargs)
        return Run()

    module = types.ModuleType("wandb")
    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.setenv("WANDB_API_KEY", "not-a-real-key")
    return calls


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_lines(tmp_path: Path, no_tensorboard: None) -> None:
    logdir = tmp_path / "run"
    with MetricsLogger(logdir, CONFIG) as logger:
        assert logger.backends == ["jsonl"]
        logger.log(1, {"loss": 0.5, "lr": torch.tensor(1e-4)})
        logger.log(2, {"loss": 0.25, "step": 99})
    logger.log(3, {"loss": 0.0})  # after close: ignored
    lines = read_lines(logdir / "metrics.jsonl")
    assert lines == [{"step": 1, "loss": 0.5, "lr": pytest.approx(1e-4)}, {"step": 2, "loss": 0.25}]
    assert sorted(p.name for p in logdir.iterdir()) == ["metrics.jsonl"]
    with MetricsLogger(logdir, CONFIG) as logger:  # a resumed run appends
        logger.log(3, {"loss": 0.125})
    assert [line["step"] for line in read_lines(logdir / "metrics.jsonl")] == [1, 2, 3]
    path = logdir / "metrics.jsonl"  # a run killed in the middle of writing step 4's line, resumed at step 3
    path.write_text(path.read_text() + '{"step": 4, "loss": 0.06')
    with MetricsLogger(logdir, CONFIG, start_step=3) as logger:
        logger.log(4, {"loss": 0.0625})
    assert read_lines(path) == [{"step": 1, "loss": 0.5, "lr": pytest.approx(1e-4)}, {"step": 2, "loss": 0.25},
                                {"step": 3, "loss": 0.125}, {"step": 4, "loss": 0.0625}]


def test_tensorboard_scalars(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, CONFIG) as logger:
        assert "tensorboard" in logger.backends
        for step in (10, 20, 30):
            logger.log(step, {"loss": 1.0 / step, "bits_per_dim": 2.0 + step})
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"loss", "bits_per_dim"}
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [10, 20, 30]
    assert [e.value for e in loss] == pytest.approx([0.1, 0.05, 1 / 30])
    assert [e.value for e in events.Scalars("bits_per_dim")] == pytest.approx([12.0, 22.0, 32.0])


def test_a_resumed_run_replaces_the_tensorboard_steps_of_the_killed_one(tmp_path: Path) -> None:
    """A run killed after logging steps 1-5 whose last checkpoint is step 2 trains steps 3-5 again: TensorBoard shows
    each step once, with the new values."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, CONFIG) as logger:
        for step in range(1, 6):
            logger.log(step, {"loss": float(step)})
    time.sleep(1.1)  # a rerun opens its event file in a later second (files are read in the order of their names)
    with MetricsLogger(tmp_path, CONFIG, start_step=2) as logger:
        for step in range(3, 5):
            logger.log(step, {"loss": 10.0 * step})
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    loss = events.Scalars("loss")
    assert [(e.step, e.value) for e in loss] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_wandb_run_is_created_and_resumed(tmp_path: Path, fake_wandb, monkeypatch: pytest.MonkeyPatch,
                                          no_tensorboard: None) -> None:
    monkeypatch.setenv("WANDB_PROJECT", "my-project")
    logdir = tmp_path / "t2i_run"
    with MetricsLogger(logdir, CONFIG) as logger:
        assert logger.backends == ["jsonl", "wandb"]
        logger.log(5, {"loss": 0.5, "step": 5})
    run_id = (logdir / "wandb_id.txt").read_text().strip()
    assert run_id
    assert fake_wandb.init == [dict(project="my-project", name="t2i_run", id=run_id, resume="allow",
                                    config=CONFIG, dir=str(logdir))]
    assert fake_wandb.log == [({"loss": 0.5}, 5)] and fake_wandb.finish == 1
    monkeypatch.delenv("WANDB_PROJECT")
    with MetricsLogger(logdir, CONFIG) as logger:  # resume: same run id, default project
        logger.log(6, {"loss": 0.4})
    assert fake_wandb.init[1]["id"] == run_id and fake_wandb.init[1]["project"] == "starflow"
    assert fake_wandb.log[1] == ({"loss": 0.4}, 6)
    assert (logdir / "wandb_id.txt").read_text().strip() == run_id


def test_no_wandb_without_key(tmp_path: Path, fake_wandb, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY")
    MetricsLogger(tmp_path, CONFIG).close()
    assert fake_wandb.init == [] and not (tmp_path / "wandb_id.txt").exists()


def test_warns_once_when_key_set_but_wandb_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   no_tensorboard: None) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "not-a-real-key")
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.warns(UserWarning, match="pip install wandb"):
        logger = MetricsLogger(tmp_path / "a", CONFIG)
    assert logger.backends == ["jsonl"]
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert read_lines(tmp_path / "a" / "metrics.jsonl") == [{"step": 1, "loss": 1.0}]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        MetricsLogger(tmp_path / "b", CONFIG).close()
    assert not [w for w in caught if "wandb" in str(w.message)]


def test_disabled_logger_writes_nothing(tmp_path: Path, fake_wandb) -> None:
    logdir = tmp_path / "rank1"
    logger = MetricsLogger(logdir, CONFIG, enabled=False)
    logger.log(1, {"loss": 0.5})
    logger.close()
    assert logger.backends == [] and not logdir.exists() and fake_wandb.init == []
