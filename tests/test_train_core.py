"""The trainer core without Ray Train runs: schedule, data checks shared by the trainers, refusing a rerun on
other data, the common flags, quiet progress bars. (The loop itself runs in the two trainers' test files.)"""
from __future__ import annotations

import io
import json
import math
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tarflow.data import schema
from tarflow.preflight import Problems, UsageError
from tarflow.train.common import OptimConfig, make_optimizer
from tarflow.train.core import TrainConfig
from tarflow.train.footers import check_one_tatok, read_footers
from tarflow.train.run import previous_facts, refuse_other_data


def _factors(opt_cfg: OptimConfig, steps: int, resume_at: int | None = None) -> list[float]:
    """The lr factor at each step, with the schedule saved and loaded into a new optimiser at `resume_at`."""
    model = torch.nn.Linear(2, 2)
    opt, sched = make_optimizer(model, opt_cfg)
    out = []
    for step in range(steps):
        if step == resume_at:
            state = torch.load(io.BytesIO(_saved(sched.state_dict())), weights_only=True)
            opt, sched = make_optimizer(model, opt_cfg)
            sched.load_state_dict(state)
        out.append(sched.get_last_lr()[0] / opt_cfg.lr)
        opt.step()
        sched.step()
    return out


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_schedule_is_transformers_warmup_cosine_and_resumes_exactly():
    """Linear warmup step / warmup (HF Trainer's: the first step at lr 0, one step behind the old hand-written
    (step + 1) / warmup), then the same cosine to 0 as before; saved and loaded mid-run it goes on unchanged."""
    cfg = OptimConfig(lr=1e-3, total_steps=110, warmup_ratio=10 / 110)
    f = _factors(cfg, 110)
    assert f[:10] == pytest.approx([s / 10 for s in range(10)])
    hand = [0.5 * (1 + math.cos(math.pi * (s - 10) / 100)) for s in range(10, 110)]  # the former formula
    assert f[10:] == pytest.approx(hand)
    assert f[60] == pytest.approx(0.5) and all(a > b for a, b in zip(f[10:], f[11:]))
    assert _factors(cfg, 110, resume_at=37) == f  # exact: the same floats
    no_warmup = _factors(OptimConfig(lr=1e-3, total_steps=20, warmup_ratio=0.0), 20)
    assert no_warmup[0] == 1.0 and no_warmup == pytest.approx([0.5 * (1 + math.cos(math.pi * s / 20))
                                                               for s in range(20)])


def _shard(path, sha: str, scales=(1,), codebook=512, vq=None):
    meta = {"model": {"sha256": sha, "checkpoint": "ta_tok.pth", "codebook_size": codebook,
                      "args": {"bottleneck_token_num": 81}}, "scales": list(scales), "vq": vq}
    sch = schema.with_metadata(schema.code_shard_schema(scales, codebook, vq), schema.CODE_SHARD_FORMAT,
                               schema.CODE_SHARD_VERSION, meta)
    pq.write_table(sch.empty_table(), path)
    return str(path)


def test_shards_of_two_tatoks_are_refused_with_the_offenders_listed(tmp_path):
    files = [_shard(tmp_path / f"{i}.parquet", "a" * 64 if i != 2 else "b" * 64) for i in range(4)]
    footers = read_footers(files)
    problems = Problems()
    assert check_one_tatok(footers, problems) == "a" * 64  # the data's TA-Tok: the most common one
    assert len(problems.lines) == 1 and "1 of 4 code shards" in problems.lines[0]
    assert files[2] in problems.lines[0] and files[0] not in problems.lines[0]
    # against a given TA-Tok every other shard is an offender
    problems = Problems()
    check_one_tatok(footers, problems, ("b" * 64, "--tatok t.pth"))
    assert "3 of 4" in problems.lines[0] and "--tatok t.pth" in problems.lines[0]
    assert all(files[i] in problems.lines[0] for i in (0, 1, 3))
    check_one_tatok(read_footers(files[:2]), problems := Problems())
    assert not problems


def test_the_mllm_trainer_refuses_mixed_tatok_data_before_ray(tmp_path):
    from tarflow.train.mllm import data_facts

    files = [_shard(tmp_path / "a.parquet", "a" * 64), _shard(tmp_path / "b.parquet", "b" * 64),
             _shard(tmp_path / "c.parquet", "a" * 64)]
    with pytest.raises(UsageError, match=r"1 of 3 code shards .*b\.parquet"):
        data_facts(read_footers(files))
    facts = data_facts(read_footers([files[0], files[2]]))
    assert facts["tokens_per_scale"] == {1: 81, 2: 16, 3: 9} and facts["codebook_size"] == 512
    assert facts["rows"] == {"caption": 0, "image_chat": 0, "text": 0}


def _run_with_facts(tmp_path, facts: dict) -> TrainConfig:
    ckpt = tmp_path / "runs" / "r" / "checkpoint_2026-11-30_00-00-00.000000"
    ckpt.mkdir(parents=True)
    (ckpt / "train_meta.json").write_text(json.dumps({"facts": facts}))
    return TrainConfig(data=[], storage_path=str(tmp_path / "runs"), name="r")


def test_a_rerun_on_other_data_is_refused(tmp_path):
    facts = {"data_files": ["/d/a.parquet"], "tatok_sha256": "a" * 64, "tokens_per_scale": {1: 81}}
    cfg = _run_with_facts(tmp_path, facts)
    assert previous_facts(cfg.storage_path, "r") == json.loads(json.dumps(facts))
    refuse_other_data(cfg, facts, problems := Problems())
    assert not problems  # the same data: resumes
    refuse_other_data(cfg, {**facts, "tatok_sha256": "b" * 64, "data_files": ["/d/b.parquet"]}, problems)
    assert len(problems.lines) == 1
    assert "run 'r'" in problems.lines[0] and "(data_files, tatok_sha256 differ)" in problems.lines[0]
    assert "another --name" in problems.lines[0]
    refuse_other_data(TrainConfig(data=[], storage_path=str(tmp_path / "runs"), name="new"), {}, problems := Problems())
    assert not problems  # a new run: nothing to compare with


def test_settings_are_checked_together():
    cfg = TrainConfig(data=[], optim=OptimConfig(total_steps=0), keep_checkpoints=0, stop_at_step=0,
                      strategy="zero3")
    cfg.check(problems := Problems())
    text = "\n".join(problems.lines)
    assert len(problems.lines) == 4
    for flag in ("--steps", "--keep-checkpoints", "--stop-at-step", "--strategy"):
        assert flag in text
    assert TrainConfig(data=[], optim=OptimConfig(total_steps=10), stop_at_step=4).end_step() == 4


def test_both_trainers_share_the_common_flags_and_their_meaning():
    import argparse

    from tarflow.train.ar_detok import ARTrainConfig
    from tarflow.train.cli import add_common_args, check_common_args, common_kwargs
    from tarflow.train.mllm import MLLMTrainConfig

    parsed = {}
    for cls in (MLLMTrainConfig, ARTrainConfig):
        p = argparse.ArgumentParser()
        add_common_args(p, cls, data_help="data")
        args = p.parse_args(["--data", "d", "--stop-at-step", "5", "--steps", "9"])
        check_common_args(p, args)
        parsed[cls] = common_kwargs(args)
        assert "absolute" in p.format_help()  # --stop-at-step says what it counts
    m, a = parsed[MLLMTrainConfig], parsed[ARTrainConfig]
    assert set(m) == set(a) and m["stop_at_step"] == a["stop_at_step"] == 5 and m["keep_checkpoints"] == 2
    assert (m["optim"].lr, a["optim"].lr) == (5e-5, 1e-4)  # each trainer's own defaults
    assert a["optim"].betas == (0.9, 0.95) and m["name"] == "tar-mllm" and a["name"] == "ar-detok"


def test_quiet_progress_bars_silence_tqdm_transformers_and_ray_data(monkeypatch):
    """What a trainer does where stdout is not a terminal: the workers' environment gets QUIET_ENV, under which
    tqdm and transformers' loading bars print nothing; Ray Data's bars are switched off in this process."""
    import os
    import subprocess
    import sys

    import ray.data

    from tarflow.train.core import QUIET_ENV, quiet_progress_bars

    script = ("from tqdm.auto import tqdm; from transformers.utils import logging as l\n"
              "for _ in tqdm(range(3)): pass\n"
              "for _ in l.tqdm(range(3)): pass\n")
    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENV}
    loud = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert loud.stderr.count("3/3") == 2  # both bars appear without it
    quiet = subprocess.run([sys.executable, "-c", script], env={**env, **QUIET_ENV}, capture_output=True, text=True,
                           timeout=120)
    assert quiet.returncode == 0 and quiet.stderr == ""
    for k in QUIET_ENV:
        monkeypatch.delenv(k, raising=False)
    ctx = ray.data.DataContext.get_current()
    monkeypatch.setattr(ctx, "enable_progress_bars", True)
    quiet_progress_bars()
    from transformers.utils import logging as hf_logging

    assert not ctx.enable_progress_bars and not hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()


def test_read_footers_reports_unreadable_files(tmp_path):
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    pq.write_table(pa.table({"conversations": [[{"from": "human", "value": "hi"}]]}), tmp_path / "chat.parquet")
    junk, chat = read_footers([str(tmp_path / "junk.parquet"), str(tmp_path / "chat.parquet")])
    assert junk.error and "not a readable Parquet file" in junk.error
    assert chat.error is None and chat.meta is None and chat.columns == ["conversations"] and chat.num_rows == 1


def test_trainer_errors_come_out_of_ray_train_as_one_line_and_interrupts_say_where_the_run_stands(tmp_path, capsys,
                                                                                                    monkeypatch):
    """The trainers' driver wrapper (tarflow.driver.run_driver through tarflow.train.cli): a worker's error that
    Ray Train wraps (WorkerGroupError: lowest rank first; ControllerError) is one line with the traceback in a
    log file, exit 2 for bad input a worker found and 1 otherwise; an interrupt names the latest checkpoint."""
    import argparse
    import os

    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    from tarflow.train.cli import run_trainer

    def trainer(error):
        def train(cfg, plan):
            raise error
        args = argparse.Namespace(address=None, summary_json=None)
        return run_trainer(lambda cfg: {}, train, TrainConfig(data=["d"], storage_path=str(tmp_path), name="r"),
                           args, "Tar MLLM")

    import tarflow.pipelines.runtime as runtime

    monkeypatch.setattr(runtime, "init_ray", lambda *a, **k: None)  # no Ray: the errors come from `train`
    rc = trainer(WorkerGroupError("worker 1 failed", {1: RuntimeError("late"),
                                                      0: UsageError(["--data d/x.parquet: no caption column"])}))
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: UsageError: --data d/x.parquet: no caption"), err
    assert "(traceback: " in err[0] and os.path.exists(err[0].rsplit("(traceback: ", 1)[1].rstrip(")"))
    rc = trainer(ControllerError(RuntimeError("placement group could not be scheduled")))
    err = capsys.readouterr().err.splitlines()
    assert rc == 1 and err[0].startswith("error: RuntimeError: placement group could not be scheduled"), err
    # SIGINT/SIGTERM while training: where the run stands, from its latest checkpoint
    rc = trainer(KeyboardInterrupt())
    assert rc == 130 and "tarflow train-tar-mllm: interrupted (SIGINT) before the first checkpoint of run 'r'" \
        in capsys.readouterr().err
    # the checkpoint Ray Train registered (its record names it), not a newer folder it never registered
    ckpt, unregistered = (tmp_path / "r" / f"checkpoint_2026-12-01_10-0{m}-00.000000" for m in (0, 1))
    for folder, step in ((ckpt, 40), (unregistered, 50)):
        folder.mkdir(parents=True)
        (folder / "train_meta.json").write_text(json.dumps({"step": step}))
    import ray.train

    registered = types.SimpleNamespace(checkpoint=types.SimpleNamespace(path=str(ckpt)))
    monkeypatch.setattr(ray.train.Result, "from_path",
                        classmethod(lambda cls, path: registered if path == str(tmp_path / "r") else None))
    rc = trainer(KeyboardInterrupt())
    line = capsys.readouterr().err.strip()
    assert rc == 130 and line == (f"tarflow train-tar-mllm: interrupted (SIGINT) at step 40 of 1000 (checkpoint: "
                                  f"{ckpt}); rerun the same command to resume from it"), line
