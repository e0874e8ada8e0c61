"""Stage two: training from a cache, resume, run manifest, settings errors."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from kdpipe.pipeline.errors import CacheFormatError, ConfigError, IntegrityError
from kdpipe.pipeline.train.checkpoint import write_run_json
from kdpipe.pipeline.train.trainer import Trainer
from kdpipe.pipeline.train.config import TrainConfig, merge_config
from kdpipe.stages.cli import main

STUDENT = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 300, "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}


@pytest.fixture(scope="module")
def lm_cache(tiny_lm_dir, text_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "cache"
    result = CliRunner().invoke(main, [
        "cache-teacher", "--teacher", str(tiny_lm_dir), "--data", str(text_dir), "--out", str(out),
        "--top-k", "32", "--seq-len", "32", "--limit-rows", "200", "--shard-size-mb", "0.1",
        "--temperature", "1", "--temperature", "2",
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture()
def student_config(tmp_path):
    path = tmp_path / "student.json"
    path.write_text(json.dumps(STUDENT))
    return path


def make_config(cache, student, out, **overrides):
    values = dict(cache=str(cache), student=str(student), out=str(out), steps=6, batch_size=4,
                  eval_every=0, checkpoint_every=3, log_every=1, shuffle_buffer=8, lr=3e-3, seed=1)
    values.update(overrides)
    config = TrainConfig(**values)
    config.validate()
    return config


def train(config, *, resume=False, stop_after=None):
    trainer = Trainer(config, resume=resume)
    trainer.setup()

    def on_step(metrics):
        if stop_after is not None and metrics["step"] == stop_after:
            raise KeyboardInterrupt  # a crash right after the checkpoint at this step

    try:
        trainer.fit(on_step=on_step)
    except KeyboardInterrupt:
        return trainer
    trainer.finish({})
    return trainer


def test_resumed_run_equals_uninterrupted_run(lm_cache, student_config, tmp_path):
    full = train(make_config(lm_cache, student_config, tmp_path / "full"))
    train(make_config(lm_cache, student_config, tmp_path / "cut"), stop_after=3)
    resumed = train(make_config(lm_cache, student_config, tmp_path / "cut"), resume=True)
    assert resumed.step == full.step == 6
    for (name, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_kd_student_gets_closer_to_the_teacher(lm_cache, student_config, tmp_path):
    config = make_config(lm_cache, student_config, tmp_path / "kd", steps=60, alpha=1.0, temperature=2.0,
                         checkpoint_every=0, eval_fraction=0.1, eval_every=60)
    trainer = Trainer(config)
    trainer.setup()
    before = trainer.evaluate()["kl_topk_bins"]
    metrics = trainer.fit()
    after = trainer.evaluate()["kl_topk_bins"]
    assert after < 0.8 * before, (before, after)
    run = trainer.finish(metrics)
    assert run["cache_manifest_sha256"] == trainer.cache.manifest_sha256
    assert run["resolved_settings"]["alpha"] == 1.0 and run["final_eval_metrics"]["kl_topk_bins"] > 0
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "kd" / "model")
    assert torch.equal(reloaded.lm_head.weight, trainer.model.lm_head.weight)


def test_schedule_switches_temperature_and_alpha(lm_cache, student_config, tmp_path):
    config = make_config(lm_cache, student_config, tmp_path / "sched", schedule="0:T=2,alpha=0.9;3:T=1,alpha=0.5")
    train(config)
    records = [json.loads(line) for line in (tmp_path / "sched" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["temperature"], r["alpha"]) for r in records] == [(2.0, 0.9)] * 3 + [(1.0, 0.5)] * 3


def test_uncaptured_temperature_is_refused(lm_cache, student_config, tmp_path):
    with pytest.raises(CacheFormatError, match="captured: 1, 2"):
        Trainer(make_config(lm_cache, student_config, tmp_path / "t", schedule="0:T=4")).setup()


def test_resume_refuses_other_runs_and_changed_caches(lm_cache, student_config, tmp_path):
    with pytest.raises(ConfigError, match="holds no kdpipe training run"):
        Trainer(make_config(lm_cache, student_config, tmp_path / "none"), resume=True).setup()
    train(make_config(lm_cache, student_config, tmp_path / "run"), stop_after=3)
    with pytest.raises(ConfigError, match="already holds a training run"):
        Trainer(make_config(lm_cache, student_config, tmp_path / "run")).setup()
    with pytest.raises(ConfigError, match="settings.lr"):
        Trainer(make_config(lm_cache, student_config, tmp_path / "run", lr=1e-2), resume=True).setup()
    run_json = tmp_path / "run" / "run.json"
    run = json.loads(run_json.read_text())
    run["cache_manifest_sha256"] = "0" * 64
    run_json.write_text(json.dumps(run))
    with pytest.raises(IntegrityError, match="run.json is damaged or was edited"):
        Trainer(make_config(lm_cache, student_config, tmp_path / "run"), resume=True).setup()
    write_run_json(run_json.parent, run)  # recorded as trained on another cache, with a valid checksum
    with pytest.raises(IntegrityError, match="the cache's manifest or shard hashes differ"):
        Trainer(make_config(lm_cache, student_config, tmp_path / "run"), resume=True).setup()


def test_student_vocabulary_must_cover_the_tokenizer(lm_cache, tmp_path):
    small = tmp_path / "small.json"
    small.write_text(json.dumps({**STUDENT, "vocab_size": 200}))
    with pytest.raises(ConfigError, match="does not cover the 300 tokens"):
        Trainer(make_config(lm_cache, small, tmp_path / "v")).setup()


def test_config_file_keys_types_and_flag_overrides(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('cache = "c"\nstudent = "s"\nout = "o"\nsteps = 10\nalpha = 0.7\nbatch-size = 4\n')
    config = merge_config(str(good), {"alpha": 0.2, "steps": None})
    assert (config.alpha, config.steps, config.batch_size) == (0.2, 10, 4)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('cache = "c"\nstudent = "s"\nout = "o"\nsteps = 10\nalhpa = 0.7\n')
    with pytest.raises(ConfigError, match="unknown config key 'alhpa'"):
        merge_config(str(unknown), {})
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('cache = "c"\nstudent = "s"\nout = "o"\nsteps = "ten"\n')
    with pytest.raises(ConfigError, match="'steps' must be int"):
        merge_config(str(wrong), {})


def test_missing_shard_is_refused_before_anything_is_written(lm_cache, student_config, tmp_path):
    import shutil

    broken = tmp_path / "cache"
    shutil.copytree(lm_cache, broken)
    shard = sorted((broken / "shards").iterdir())[1]
    shard.rename(tmp_path / shard.name)
    with pytest.raises(IntegrityError, match=f"{shard.name} is missing"):
        Trainer(make_config(broken, student_config, tmp_path / "run")).setup()
    assert not (tmp_path / "run" / "run.json").exists()
    (tmp_path / shard.name).rename(shard)
    train(make_config(broken, student_config, tmp_path / "run"))
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_explicit_tokenizer_must_load(lm_cache, student_config, tmp_path):
    with pytest.raises(ConfigError, match="cannot load the tokenizer"):
        Trainer(make_config(lm_cache, student_config, tmp_path / "t", tokenizer=str(tmp_path))).setup()


def test_fused_loss_trains_like_the_unfused_one_and_run_json_says_which_ran(lm_cache, student_config, tmp_path):
    fused = train(make_config(lm_cache, student_config, tmp_path / "fused", alpha=0.5, temperature=2.0))
    plain = train(make_config(lm_cache, student_config, tmp_path / "plain", alpha=0.5, temperature=2.0, fused_loss=False))
    assert fused.head is not None and plain.head is None
    for (name, a), (_, b) in zip(fused.model.state_dict().items(), plain.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5, msg=name)
    ran = {name: json.loads((tmp_path / name / "run.json").read_text())["loss_implementation"] for name in ("fused", "plain")}
    assert ran["fused"].startswith("fused") and ran["plain"].startswith("unfused") and "--no-fused-loss" in ran["plain"]
