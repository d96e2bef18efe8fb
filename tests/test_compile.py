"""``compile: 1``: every transformer layer compiled for training gives the eager losses."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from starflow.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    """No compiled graphs from before the test, and none left after it (also when it fails)."""
    import torch._dynamo  # noqa: F401  (torch.compile's compiler, loaded by the first compile otherwise)

    torch._dynamo.reset()
    try:
        yield
    finally:
        torch._dynamo.reset()


@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_training_matches_eager(tiny_config, digits, tmp_path: Path) -> None:
    from torch._dynamo.utils import counters

    counters.clear()
    losses = {}
    for flag in (0, 1):
        config = tmp_path / f"config_{flag}.yaml"
        config.write_text(yaml.safe_dump(dict(tiny_config, steps=5, save_freq=5, log_freq=1, compile=flag)))
        logdir = tmp_path / f"run_{flag}"
        with torch.random.fork_rng(devices=[]):
            assert main(["train", "--config", str(config), "--data", str(digits["train"]), "--logdir", str(logdir),
                         "--device", "cpu"]) == 0
        records = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
        losses[flag] = [r["loss"] for r in records if "loss" in r]
        if flag == 0:
            assert counters["stats"]["unique_graphs"] == 0
    assert counters["stats"]["unique_graphs"] > 0  # the layers were compiled
    assert not counters["graph_break"], f"a compiled layer was split: {dict(counters['graph_break'])}"
    assert len(losses[1]) == 5
    np.testing.assert_allclose(losses[1], losses[0], rtol=0, atol=1e-5)
