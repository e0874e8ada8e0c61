"""Stage two under torchrun on CPU (gloo): DistributedDataParallel equals one process with the global
batch, uneven row counts, resume, and rank 0 alone writing the run directory."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from kdpipe.pipeline.train.config import TrainConfig
from kdpipe.stages.cli import main

pytestmark = pytest.mark.slow

STUDENT = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 300, "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
KDPIPE = str(Path(sys.executable).parent / "kdpipe")
HELPER = str(Path(__file__).parents[1] / "ddp_train.py")


@pytest.fixture(scope="module")
def cache(full_rows_cache):
    return full_rows_cache


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    path = tmp_path_factory.mktemp("student") / "student.json"
    path.write_text(json.dumps(STUDENT))
    return path


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def train_flags(cache, student, out, *, batch_size: int, steps: int) -> list[str]:
    return ["train-student", "--cache", str(cache), "--student", str(student), "--out", str(out),
            "--batch-size", str(batch_size), "--steps", str(steps), "--lr", "3e-3", "--seed", "1",
            "--eval-fraction", "0", "--device", "cpu"]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


def test_two_ranks_with_batch_b_train_like_one_process_with_batch_2b(cache, student, tmp_path):
    one = CliRunner().invoke(main, train_flags(cache, student, tmp_path / "one", batch_size=8, steps=4),
                             catch_exceptions=False)
    assert one.exit_code == 0, one.output
    two = torchrun("-m", "kdpipe", *train_flags(cache, student, tmp_path / "two", batch_size=4, steps=4))
    assert "on 2 ranks" in two.stdout and two.stdout.count("wrote ") == 1  # rank 0 alone reports
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert a.keys() == b.keys()
    initial = CliRunner().invoke(main, train_flags(cache, student, tmp_path / "zero", batch_size=8, steps=1))
    assert initial.exit_code == 0
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    assert any(not torch.equal(a[n], weights(tmp_path / "zero")[n]) for n in a)  # training moved them
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["distributed"] == {"world_size": 2, "per_rank_batch_size": 4, "global_batch_size": 8,
                                  "rows_per_step": 8, "backend": "gloo", "sharding": "ddp"}
    assert [json.loads(line)["step"] for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["split"] == "train"] == [4]  # written once, by rank 0


def write_config(path: Path, **values) -> str:
    config = TrainConfig(**values)
    config.validate()
    path.write_text(json.dumps(dataclasses.asdict(config)))
    return str(path)


def test_a_distributed_run_over_uneven_epochs_resumes_to_the_uninterrupted_result(cache, student, tmp_path):
    # 61 rows, 2 ranks x 3 rows: 11 steps an epoch, the last one filled up; 2 epochs = 22 steps on each rank
    common = dict(cache=str(cache), student=str(student), epochs=2.0, batch_size=3, lr=3e-3, seed=1,
                  eval_fraction=0.0, eval_every=0, checkpoint_every=5, log_every=1, device="cpu")
    full = write_config(tmp_path / "full.json", out=str(tmp_path / "full"), **common)
    cut = write_config(tmp_path / "cut.json", out=str(tmp_path / "cut"), **common)
    torchrun(HELPER, full)
    torchrun(HELPER, cut, "--stop-after", "15")  # killed after the checkpoint at step 15, mid-epoch 2
    assert not (tmp_path / "cut" / "model").exists()
    torchrun(HELPER, cut, "--resume")
    run = json.loads((tmp_path / "cut" / "run.json").read_text())
    assert run["total_steps"] == 22 and run["status"] == "finished"
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 23))


def test_resuming_with_another_number_of_ranks_is_refused(cache, student, tmp_path):
    flags = train_flags(cache, student, tmp_path / "run", batch_size=4, steps=4) + ["--checkpoint-every", "2"]
    torchrun(KDPIPE, *flags)
    result = CliRunner().invoke(main, flags + ["--resume"])
    assert result.exit_code == 2 and "world_size (was 2, now 1)" in result.output


def test_when_rank_0_cannot_write_its_checkpoint_only_its_error_line_is_printed(cache, student, tmp_path):
    """Rank 0 alone may write no file over 60 kB (as on a full disk): its checkpoint of step 2 fails
    while rank 1 waits at the next gradient exchange. Rank 1 says it stopped, in a line of its own
    that is no error line and no traceback; torchrun's own failure report follows."""
    limit = str(Path(__file__).with_name("file_size_limit.py"))
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", limit, "60000", "0",
               *train_flags(cache, student, out, batch_size=4, steps=4), "--checkpoint-every", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors == [f"error: cannot write the checkpoint of step 2 to --out {out}: [Errno 27] File too large; "
                      "fix that and run the same command again (the run had no checkpoint yet)"], result.stderr[-3000:]
    ranks_output = [line for line in result.stderr.splitlines() if line.startswith("[rank")]
    assert ranks_output == [], "\n".join(ranks_output[:20])  # no worker traceback ("[rank1]: Traceback ...")
    assert "pipeline/train" not in result.stderr and "RuntimeError" not in result.stderr
    assert not (out / "checkpoint.tmp").exists() and not (out / "checkpoint").exists()
