"""DDP through the Trainer (accelerate) on two CPU processes: the same weights as one process over the same global batches."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from steerlab.interventions import fileformat
from tests.reft import _ddp_worker as worker
from tests.reliability import one_thread_fixture

_one_thread = one_thread_fixture()  # one intra-op thread: much faster on a shared 2-core machine

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process_over_the_same_global_batches(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "tests.reft._ddp_worker", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # the two processes saw disjoint shards of every global batch
    seen = [json.loads((tmp_path / "ddp" / f"seen.{r}.json").read_text()) for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == worker.STEPS
    for a, b in zip(*seen):
        assert len(a) == len(b) == worker.PER_DEVICE and not set(a) & set(b)
    _, ddp = fileformat.load(tmp_path / "ddp" / "final", kind="reft")
    # one process, batches of 2 x 2 in the same order
    worker.SEEN.clear()
    single = worker.run(tmp_path / "one", 2 * worker.PER_DEVICE)
    assert len(worker.SEEN) == worker.STEPS
    for step, (a, b, one) in enumerate(zip(*seen, worker.SEEN)):
        assert sorted(a + b) == sorted(one), step
    initial, _, _ = worker.build()
    for i, (iv, iv0) in enumerate(zip(single.interventions, initial.interventions)):
        for name, p in iv.state_dict().items():
            torch.testing.assert_close(ddp[f"{i}.{name}"], p, atol=1e-5, rtol=0)
            assert (p - iv0.state_dict()[name]).abs().max() > 1e-3  # trained away from the start
