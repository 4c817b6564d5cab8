"""AR de-tokenizer training on Ray Train, end to end on CPU with the reference's tiny consistent family at 64 px:
TA-Tok (codebook 512, 9x9 tokens, hidden 36) -> AR (cond 36, vocab 64, 81 + 16 positions) -> VQ (codebook 64,
4x4 tokens at 64 px). Training data: the bundled sample tokenized with --vq, repeated, plus a shard of bad rows.
Its Ray Train runs (straight, stopped and resumed, a worker killed, SIGTERM; each costs ~15 s of Ray start-up on a
laptop) are in the cluster group (`make test-cluster`); `make test` keeps the data's and the arguments' checks.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import reference_fixture

from tarflow.data import schema
from tarflow.data.codeshard import read_code_shard
from tarflow.data.sample import ensure_sample_shards
from tarflow.models.ar_detok import ARArgs, ARDetokenizer
from tarflow.models.tatok import TATok
from tarflow.pipelines.tokenize import TokenizeConfig, run_tokenize
from tarflow.train.ar_detok import (
    ARTrainConfig,
    init_weights,
    model_spec,
    plan_data,
    reference_checkpoint,
    run_train,
    split_rows,
)
from tarflow.train.code_data import TATokHeader
from tarflow.train.common import OptimConfig

REPEATS = 6  # the 8 sample rows 6 more times: 56 good rows + 4 bad = 60 = one epoch of 2 workers x 6 steps x 5


@pytest.fixture(scope="module")
def family():
    return {"tatok": str(reference_fixture("ta_tok") / "ta_tok.pth"), "vq": str(reference_fixture("vqvae") / "vq.pt"),
            "ar": str(reference_fixture("ar_dtok") / "ar_dtok.pth")}


def _bad_rows(good: pa.Table) -> pa.Table:
    """One row per way a row can be bad: no VQ codes, 15 VQ codes, a VQ code >= 64, a TA-Tok code >= 512."""
    rows = good.slice(0, 4).to_pylist()
    rows[0]["vq16_64"] = None
    rows[1]["vq16_64"] = rows[1]["vq16_64"][:15]
    rows[2]["vq16_64"] = [64] + rows[2]["vq16_64"][1:]
    rows[3]["tatok_s1"] = [512] + rows[3]["tatok_s1"][1:]
    i = good.schema.get_field_index("vq16_64")
    return pa.Table.from_pylist(rows, schema=good.schema.set(i, good.schema.field(i).with_nullable(True)))


def _with_facts(table: pa.Table, **changes) -> pa.Table:
    """The table with its footer facts changed (a key set to None is removed)."""
    meta = {**schema.read_metadata(table.schema, "table"), **changes}
    meta = {k: v for k, v in meta.items() if v is not None}
    return table.replace_schema_metadata({schema.PARQUET_META_KEY: json.dumps(meta).encode()})


@pytest.fixture(scope="module")
def data(ray_local, family, tmp_path_factory):
    root = tmp_path_factory.mktemp("ar-data")
    run_tokenize(TokenizeConfig(input=str(ensure_sample_shards()), output=str(root / "tok"), tatok=family["tatok"],
                                scales=[1], vq=family["vq"], vq_resolution=64, encode_batch_size=4,
                                decode_batch_size=4, progress_every_s=0))
    good = pa.concat_tables([read_code_shard(str(p)) for p in sorted((root / "tok" / "codes").glob("*.parquet"))])
    assert len(good) == 8
    (root / "more").mkdir()
    pq.write_table(pa.concat_tables([good] * REPEATS), root / "more" / "repeated.parquet")
    pq.write_table(_bad_rows(good), root / "more" / "bad.parquet")
    return {"specs": [str(root / "tok"), str(root / "more")], "good": good, "root": root}


ARGS = ["--scale", "1", "--steps", "6", "--batch-size", "5", "--lr", "3e-3", "--warmup-ratio", "0",
        "--weight-decay", "0", "--shuffle-buffer", "8", "--checkpoint-every", "3", "--log-every", "3",
        "--num-workers", "2", "--cpus-per-worker", "0.5"]


def _cfg(family, d, storage, **kw) -> ARTrainConfig:
    """The same run as ARGS, as a config."""
    optim = OptimConfig(lr=3e-3, weight_decay=0.0, betas=(0.9, 0.95), warmup_ratio=0.0, total_steps=6)
    base = {"data": d["specs"], "tatok": family["tatok"], "init": family["ar"], "scale": 1, "storage_path": storage,
            "num_workers": 2, "cpus_per_worker": 0.5, "batch_size": 5, "shuffle_buffer": 8, "checkpoint_every": 3,
            "log_every": 3, "optim": optim}
    return ARTrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def job():
    """The job script as a module (its main and parse_args)."""
    spec = importlib.util.spec_from_file_location("train_ar_detok", os.path.join(
        os.path.dirname(__file__), "..", "jobs", "train_ar_detok.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def straight(family, data, job, tmp_path_factory):
    """Fine-tune the reference AR checkpoint with 2 workers for one epoch, through the job script."""
    out = tmp_path_factory.mktemp("straight")
    t0 = time.monotonic()
    rc = job.main(["--data", *data["specs"], "--tatok", family["tatok"], "--init", family["ar"], *ARGS,
                   "--storage-path", str(out / "runs"), "--name", "straight", "--output", str(out / "ar.pth"),
                   "--summary-json", str(out / "summary.json"), "--keep-checkpoints", "1"])
    assert rc == 0
    return {"job": job, "out": out, "summary": json.loads((out / "summary.json").read_text()),
            "wall_s": time.monotonic() - t0}


def test_job_script_help_and_argument_errors(job, capsys):
    with pytest.raises(SystemExit) as e:
        job.parse_args(["--help"])
    assert e.value.code == 0 and "--stop-at-step" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        job.parse_args(["--data", "x", "--tatok", "t.pth"])  # no model: --init, --preset or sizes
    with pytest.raises(SystemExit):
        job.parse_args(["--data", "x", "--tatok", "t.pth", "--init", "a.pth", "--dim", "64"])  # init is as it is
    assert job.parse_args(["--data", "x", "--tatok", "t", "--preset", "llama-abs-S"]).betas == (0.9, 0.95)


@pytest.mark.cluster  # the straight Ray Train run (2 workers), shared with the resume tests: `make test-cluster`
def test_two_workers_loss_falls_and_bad_rows_are_counted(straight):
    s = straight["summary"]
    # checkpoints at steps 3 and 6; --keep-checkpoints 1 left the last only
    assert [p.name for p in (straight["out"] / "runs" / "straight").glob("checkpoint_*") if p.is_dir()] == \
        [s["checkpoint"].rstrip("/").rsplit("/", 1)[-1]]
    losses = [h["loss"] for h in s["history"]]
    assert [h["step"] for h in s["history"]] == list(range(1, 7)) and s["starts"] == [0]
    assert np.mean(losses[-2:]) < losses[0] - 0.3, losses
    # one epoch: every row seen once, the 4 bad ones skipped and counted, never trained on
    assert (s["metrics"]["skipped_missing"], s["metrics"]["skipped_length"], s["metrics"]["skipped_range"]) == (1, 1, 2)
    assert sum(h["rows_trained"] for h in s["history"]) == 56 and sum(h["rows"] for h in s["history"]) == 60
    assert all(h["epoch"] == 0 for h in s["history"])
    # throughput = the step's VQ tokens (16 a row) over the step's time: the times it implies are positive and
    # add up to less than the run took (a rate per row instead of per token, per millisecond, or over the
    # wrong rows would not)
    implied = [h["rows_trained"] * 16 / h["tokens_per_s"] for h in s["history"]]
    assert all(t > 0 for t in implied) and sum(implied) < straight["wall_s"], (implied, straight["wall_s"])


def test_bad_rows_are_split_off_and_counted(family, data):
    plan = plan_data(ARTrainConfig(data=data["specs"], tatok=family["tatok"]), TATokHeader.read(family["tatok"]))
    assert (plan.n_cond, plan.cond_dim, plan.n_vq, plan.vq_codebook, plan.vq_column) == (81, 36, 16, 64, "vq16_64")
    good = data["good"].slice(4, 3)
    bad = _bad_rows(data["good"])
    cond, vq, skipped = split_rows(pa.concat_tables([bad, good.cast(bad.schema)]), plan)
    assert skipped == {"missing": 1, "length": 1, "range": 2}
    assert np.array_equal(cond, np.array(good.column("tatok_s1").to_pylist()))  # only the good rows, unchanged
    assert np.array_equal(vq, np.array(good.column("vq16_64").to_pylist()))
    pq.write_table(_with_facts(data["good"].drop_columns(["vq16_64"]), vq=None), data["root"] / "no_vq.parquet")
    with pytest.raises(ValueError, match=r"no_vq.parquet: no VQ codes \(no vq16_\* column\); re-run the tokenize job "
                                         "with --vq"):
        plan_data(ARTrainConfig(data=[str(data["root"] / "no_vq.parquet")], tatok=family["tatok"]),
                  TATokHeader.read(family["tatok"]))


def test_new_model_takes_its_sizes_from_the_data(family, data):
    plan = plan_data(ARTrainConfig(data=data["specs"], tatok=family["tatok"]), TATokHeader.read(family["tatok"]))
    spec = model_spec(ARTrainConfig(data=[], tatok="", preset="llama-abs-S", n_layer=2), plan)
    assert spec["name"] == "llama-abs-custom"  # a preset changed in size is no longer that preset
    assert {k: spec["args"][k] for k in ("n_layer", "n_head", "dim", "vocab_size", "cond_dim", "cls_token_num",
                                         "max_seq_len")} == {"n_layer": 2, "n_head": 6, "dim": 384, "vocab_size": 64,
                                                             "cond_dim": 36, "cls_token_num": 81, "max_seq_len": 16}
    spec = model_spec(ARTrainConfig(data=[], tatok="", preset="llama-abs-S"), plan)
    model = ARDetokenizer(ARArgs(**spec["args"]))
    model.name = spec["name"]
    init_weights(model, 0)
    ckpt = reference_checkpoint(model)  # the reference's presets pass n_layer/n_head/dim themselves
    assert ckpt["model"]["name"] == "llama-abs-S" and "n_layer" not in ckpt["model"]["args"]
    with torch.no_grad():
        logits = model.eval()(torch.zeros(1, 15, dtype=torch.long), torch.randn(1, 81, 36))
    assert torch.all(logits == 0)  # output layer zero-initialised (the reference's): loss starts at log(vocab)
    assert math.isclose(float(torch.nn.functional.cross_entropy(logits[0], torch.zeros(16, dtype=torch.long))),
                        math.log(64), rel_tol=1e-6)


@pytest.mark.cluster  # minutes on 2 cores: the heavier group (make test-cluster)
def test_resume_reaches_the_weights_of_the_straight_run(family, data, straight, tmp_path):
    """Stopped after 3 of 6 steps, then rerun: the same weights as the straight run (same 2 workers and seed:
    optimiser state, schedule, each worker's data position and the per-step seeds all resume)."""
    storage = str(tmp_path / "runs")
    stopped = run_train(_cfg(family, data, storage, stop_at_step=3, name="again", output=str(tmp_path / "3.pth")))
    assert stopped.steps == 3
    resumed = run_train(_cfg(family, data, storage, name="again", output=str(tmp_path / "6.pth")))
    assert resumed.starts == [0, 3] and [h["step"] for h in resumed.history] == list(range(1, 7))
    want = ARDetokenizer.from_checkpoint(str(straight["out"] / "ar.pth")).state_dict()
    torch.testing.assert_close(ARDetokenizer.from_checkpoint(str(tmp_path / "6.pth")).state_dict(), want)
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in straight["summary"]["history"]])
    assert not torch.equal(ARDetokenizer.from_checkpoint(str(tmp_path / "3.pth")).output.weight, want["output.weight"])
    # a rerun of the run onto other data refuses before starting
    other = _with_facts(data["good"], vq={**schema.read_metadata(data["good"].schema, "t")["vq"], "sha256": "0" * 64})
    pq.write_table(other, tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="'again' .* was trained on other data \\(files, vq_sha256 differ"):
        run_train(_cfg(family, data, storage, name="again", data=[str(tmp_path / "other.parquet")]))


def test_bad_arguments_and_paths_are_reported_together_before_ray_starts(family, data, job, capsys, monkeypatch,
                                                                         tmp_path):
    import tarflow.pipelines.runtime

    def no_ray(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(tarflow.pipelines.runtime, "init_ray", no_ray)
    rc = job.main(["--data", str(tmp_path / "nowhere"), "--tatok", str(tmp_path / "no.pth"), "--init",
                   str(tmp_path / "no_ar.pth"), "--steps", "0"])
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert rc == 2 and len(lines) == 4, lines
    for what in ("--steps", "--tatok " + str(tmp_path / "no.pth"), "--init " + str(tmp_path / "no_ar.pth"),
                 "--data " + str(tmp_path / "nowhere")):
        assert sum(line.startswith(f"error: {what}: ") for line in lines) == 1, (what, lines)
    # shards without VQ codes, and a checkpoint that does not fit: one line each
    no_vq = data["root"] / "no_vq_only"
    no_vq.mkdir(exist_ok=True)
    pq.write_table(_with_facts(data["good"].drop_columns(["vq16_64"]), vq=None), no_vq / "a.parquet")
    rc = job.main(["--data", str(no_vq), "--tatok", family["tatok"], "--preset", "llama-abs-S"])
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert rc == 2 and len(lines) == 1 and "a.parquet: no VQ codes (no vq16_* column)" in lines[0]


@pytest.mark.cluster  # the straight run's output: `make test-cluster`
def test_exported_checkpoint_loads_and_generates(family, data, straight):
    path = straight["out"] / "ar.pth"
    ar = ARDetokenizer.from_checkpoint(str(path))
    ckpt = straight["summary"]["checkpoint"]
    torch.testing.assert_close(ar.state_dict(), ARDetokenizer.from_checkpoint(f"{ckpt}/ar_dtok.pth").state_dict(),
                               rtol=0, atol=0)  # the output is the last checkpoint's model
    assert ar.name == "llama-abs-tiny"  # a fine-tuned checkpoint keeps its name and args
    assert (ar.args.cond_dim, ar.args.vocab_size, ar.args.cls_token_num, ar.args.max_seq_len) == (36, 64, 81, 16)
    tatok = TATok.from_checkpoint(family["tatok"])
    cond = tatok.decode(torch.tensor(data["good"].column("tatok_s1").to_pylist()[:2]))
    tokens = ar.generate(cond, cfg_scale=4.0, top_k=1)
    assert tokens.shape == (2, 16) and 0 <= int(tokens.min()) and int(tokens.max()) < 64
    assert not torch.equal(ar.output.weight, ARDetokenizer.from_checkpoint(family["ar"]).output.weight)  # trained


@pytest.mark.cluster  # fault injection: run by `make test-cluster`
def test_a_worker_killed_mid_run_is_restarted_and_reaches_the_straight_runs_weights(family, data, straight,
                                                                                    tmp_path):
    import functools

    from faults import die_once_after_report

    from tarflow.train.ar_detok import train_loop

    marker = str(tmp_path / "died")
    # the wait: the step-3 report (and checkpoint) reaches the controller before the worker dies
    summary = run_train(_cfg(family, data, str(tmp_path / "runs"), name="killed", output=str(tmp_path / "6.pth")),
                        loop=functools.partial(die_once_after_report, train_loop),
                        loop_extra={"marker": marker, "die_after_step": 3, "die_wait_s": 3})
    assert os.path.exists(marker)  # the worker did die, after the step-3 checkpoint
    assert summary.steps == 6 and summary.starts == [0, 3]  # Ray Train restarted the workers from it
    torch.testing.assert_close(ARDetokenizer.from_checkpoint(str(tmp_path / "6.pth")).state_dict(),
                               ARDetokenizer.from_checkpoint(str(straight["out"] / "ar.pth")).state_dict())


@pytest.mark.cluster  # fault injection (SIGTERM to a trainer), minutes on 2 cores
def test_sigterm_stops_a_trainer_with_where_it_stands_and_a_rerun_resumes(family, data, straight, tmp_path):
    """SIGTERM (what `ray job stop` sends) to a training job after its first checkpoint: exit 143, no traceback,
    one line with the step and the checkpoint a rerun resumes from; the rerun of the same command resumes there.
    The trainers share the jobs' driver wrapper (tarflow.driver.run_driver)."""
    import sys

    from faults import sigterm_when

    storage, name = tmp_path / "runs", "stopped"
    argv = [sys.executable, os.path.join(os.path.dirname(__file__), "..", "jobs", "train_ar_detok.py"),
            "--data", *data["specs"], "--tatok", family["tatok"], "--init", family["ar"], "--scale", "1",
            "--steps", "500", "--batch-size", "5", "--checkpoint-every", "2", "--log-every", "2",
            "--num-workers", "1", "--cpus-per-worker", "0.5", "--storage-path", str(storage), "--name", name]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own private Ray, as from a shell
    # after Ray Train registered the first checkpoint (its record of them is written with each)
    rc, stdout, stderr = sigterm_when(argv, lambda: (storage / name / "checkpoint_manager_snapshot.json").exists(),
                                      env)
    assert rc == 143, stderr[-3000:]
    own = [ln for ln in stderr.splitlines() if "pid=" not in ln]  # not the lines Ray forwards from its actors
    assert not any("Traceback" in ln or "KeyboardInterrupt" in ln for ln in own), own[-40:]
    line = next(ln for ln in stderr.splitlines() if ln.startswith("tarflow train-ar-de-tokenizer: interrupted"))
    step = int(line.split("(SIGTERM) at step ", 1)[1].split(" ", 1)[0])
    assert step >= 2 and step % 2 == 0 and " of 500 (checkpoint: " in line, line
    assert line.endswith("rerun the same command to resume from it"), line
    # the same command again (stopped two steps later) starts from that checkpoint, data position and all
    assert straight["job"].main([*argv[2:], "--stop-at-step", str(step + 2),
                                 "--summary-json", str(tmp_path / "s.json")]) == 0
    resumed = json.loads((tmp_path / "s.json").read_text())
    assert resumed["steps"] == step + 2 and resumed["starts"][-1] == step
