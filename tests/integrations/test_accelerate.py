"""kdpipe batches through real ``accelerate`` (issue 26 item 1): ``accelerator.prepare(DataLoader(...))``
with one process and with two CPU processes (torchrun, gloo), with and without ``dispatch_batches``.

Each process runs tests/integrations/accelerate_worker.py on a cache of 45 rows (batches of 4 rows per
process: the last global batch is short and filled, as kdpipe's own ranks fill it) and records, per
step, the rows (``sample_index``) it got. Checked here: every process gets exactly what kdpipe's own
rank of that number reads (rows and every collated tensor), the processes' rows of a step are
disjoint and together are the one-process batch of that step, an epoch covers every row, and the
per-process sums of the loss add up to the one-process sum.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import kdpipe

pytest.importorskip("accelerate")

WORKER = Path(__file__).with_name("accelerate_worker.py")
ROWS, BATCH = 45, 4


@pytest.fixture(scope="module")
def cache_dir(capture_small_cache) -> Path:
    return capture_small_cache("accelerate", ROWS)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(cache_dir: Path, out: Path, *, processes: int, dispatch: str, loader_batch: str) -> list[dict]:
    args = [str(WORKER), str(cache_dir), str(out), "--dispatch", dispatch, "--loader-batch", loader_batch,
            "--batch-size", str(BATCH)]
    if processes > 1:
        args = ["-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-addr", "127.0.0.1",
                "--master-port", str(_free_port())] + args
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]
    assert [(r["rank"], r["world_size"]) for r in records] == [(r, processes) for r in range(processes)]
    return records


def one_process_epochs(cache_dir: Path, global_batch: int) -> list[list[list[int]]]:
    """The rows of each batch of one process reading whole global batches, epochs 0 and 1."""
    data = kdpipe.CacheDataset(cache_dir, batch_size=global_batch, seed=3, shuffle_window=16, rank=0, world_size=1)
    epochs = []
    for epoch in range(2):
        data.set_epoch(epoch)
        epochs.append([b["sample_index"].tolist() for b in DataLoader(data, batch_size=None)])
    return epochs


def one_process_loss_sums(cache_dir: Path, global_batch: int) -> list[float]:
    """The summed loss (zero logits, as the worker computes it) of each global batch of epoch 0."""
    cache = kdpipe.open_cache(cache_dir)
    data = kdpipe.CacheDataset(cache, batch_size=global_batch, seed=3, shuffle_window=16, rank=0, world_size=1)
    loss_fn = kdpipe.DistillationLoss(alpha=0.5, temperature=2.0, reduction="sum")
    vocab = int(cache.manifest["capture"]["teacher_vocab_size"])
    sums = []
    for batch in DataLoader(data, batch_size=None, collate_fn=kdpipe.TargetCollator(cache, temperature=2.0)):
        sums.append(float(loss_fn(batch["teacher"], torch.zeros(*batch["teacher"]["kd_mask"].shape, vocab))["loss"]))
    return sums


@pytest.mark.parametrize("processes,dispatch,loader_batch", [
    (1, "yes", "none"), (1, "no", "none"), (1, "yes", "1"), (1, "no", "1"),
    pytest.param(2, "yes", "none", marks=pytest.mark.slow), pytest.param(2, "yes", "1", marks=pytest.mark.slow),
    pytest.param(2, "no", "1", marks=pytest.mark.slow),  # no dispatch needs batch_size=1: accelerate multiplies it
])
def test_prepared_loader_gives_each_process_its_rank_share(cache_dir, tmp_path, processes, dispatch, loader_batch):
    records = run_worker(cache_dir, tmp_path / "out", processes=processes, dispatch=dispatch, loader_batch=loader_batch)
    steps_per_epoch = -(-ROWS // (BATCH * processes))
    whole = one_process_epochs(cache_dir, BATCH * processes)
    for record in records:
        assert record["len"] == steps_per_epoch  # len(prepared loader): the steps of an epoch
        for epoch in record["epochs"]:
            # exactly kdpipe's own rank of this number: the same rows and the same collated tensors
            assert len(epoch["steps"]) == epoch["expected_steps"] == steps_per_epoch
            assert all(epoch["same_as_own_rank"])
    for e in range(2):
        by_step = list(zip(*(record["epochs"][e]["steps"] for record in records)))
        for step, (shares, one) in enumerate(zip(by_step, whole[e])):
            rows = [i for share in shares for i in share]
            assert len(rows) == len(set(rows)), f"epoch {e} step {step}: processes share rows {shares}"
            if step < steps_per_epoch - 1:
                assert sorted(rows) == sorted(one)
            else:  # the short last global batch, filled up to a multiple of the processes with the first rows
                assert set(one) <= set(rows) and set(rows) - set(one) <= set(whole[e][0])
                assert len(rows) == len(one) + (-len(one)) % processes
        seen = {i for shares in by_step for share in shares for i in share}
        assert len(seen) == ROWS
    assert [s[0] for s in records[0]["epochs"][0]["steps"]] != [s[0] for s in records[0]["epochs"][1]["steps"]]
    # the loss's sums and counts add up over processes to the one-process batch's (full global batches)
    sums = one_process_loss_sums(cache_dir, BATCH * processes)
    for step in range(steps_per_epoch - 1):
        across = sum(record["epochs"][0]["losses"][step][0] for record in records)
        assert across == pytest.approx(sums[step], rel=1e-5)
        counts = [record["epochs"][0]["losses"][step][1] for record in records]
        assert sum(counts) == BATCH * processes * 16  # every position of every row counts for KD
