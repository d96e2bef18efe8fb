"""``starflow.train.memory``: with freed memory retained, re-allocating a step's tensors takes no page faults."""
from __future__ import annotations

import subprocess
import sys

import pytest

from starflow.train import launch

FAULTS = """
import resource, sys, torch
from starflow.train.memory import retain_freed_memory
threshold = retain_freed_memory() if sys.argv[1] == "1" else 0
def step():  # a training step's pattern: a large activation and a smaller one, then both freed
    a = torch.ones(48 << 18); b = torch.ones(3 << 18); del a, b
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(threshold, *faults[2:])  # after two steps the heap has grown to the step's size
"""


def page_faults(retain: bool) -> tuple[int, list[int]]:
    """(threshold applied, minor page faults of each step) of a fresh process allocating 48 + 3 MiB per step."""
    r = subprocess.run([sys.executable, "-c", FAULTS, "1" if retain else "0"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    threshold, *faults = map(int, r.stdout.split())
    return threshold, faults


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_retained_memory_is_reused_without_page_faults() -> None:
    threshold, retained = page_faults(retain=True)
    assert threshold == 1 << 30
    _, default = page_faults(retain=False)
    pages = (48 << 20) // 4096
    assert min(default) > pages / 2  # glibc's defaults map the 48 MiB block afresh every step (above its 32 MiB cap)
    assert sorted(retained)[len(retained) // 2] < 16, retained  # most steps take none (memalign can re-split once)


@pytest.mark.parametrize("retain", [True, False])
def test_training_on_a_cpu_applies_malloc_retain_only_when_set(tiny_config, digits, tmp_path, monkeypatch,
                                                              retain: bool) -> None:
    from starflow.config import load_config
    from starflow.distributed import init_distributed

    calls = []
    monkeypatch.setattr(launch, "retain_freed_memory", lambda: calls.append(1) or 0)
    config = dict(tiny_config, data=str(digits["train"]), malloc_retain=retain, logdir=str(tmp_path))
    launch.build_trainer(load_config(config), init_distributed("cpu"))
    assert calls == ([1] if retain else [])
