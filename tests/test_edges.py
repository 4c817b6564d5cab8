"""Reliability at the edges (issue 21): empty input shards, retries only for transient errors, a poisoned
accelerator, a starved job that ends, Ray's own lines kept off a job's output."""
from __future__ import annotations

import json
import logging
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import shardmaker
import slowstages
from test_reader_faults import _raised_while_handling

from tarflow.data import img2dataset as i2d
from tarflow.data import storage
from tarflow.models.demo import ensure_random_tatok
from tarflow.pipelines import runtime, sharded
from tarflow.pipelines.sharded import pools
from tarflow.pipelines.tokenize import TokenizeConfig, run_tokenize


@pytest.fixture(scope="module")
def tatok_path():
    return str(ensure_random_tatok())


def _cfg(**kw) -> TokenizeConfig:
    kw.setdefault("scales", [1])
    kw.setdefault("encode_batch_size", 2)
    kw.setdefault("decode_batch_size", 2)
    kw.setdefault("progress_every_s", 0)
    return TokenizeConfig(**kw)


# ----------------------------------------------------------------------------------------------------------
# Empty shards


def test_empty_shards_are_written_with_a_manifest_of_0_skipped_by_a_rerun_and_counted(ray_local, tmp_path,
                                                                                         tatok_path):
    """img2dataset's own output when every download of a shard failed: a tar with no members, in the parquet
    format a Parquet of only failed rows. Each is a shard of 0 samples in every job: tokenize writes a code shard
    of 0 rows with its manifest, caption a captions file of 0 rows; reruns skip them; summaries count them."""
    from tarflow.data.codeshard import read_code_shard
    from tarflow.pipelines.caption import CaptionConfig, run_caption

    photo = shardmaker.sample_images()[:1]
    for fmt in ("webdataset", "parquet"):
        # rows: photo, 404, 404, 404 -> shard 00000 = photo + a failed row, shard 00001 = two failed rows
        src = shardmaker.build_with_img2dataset(str(tmp_path / fmt), photo, output_format=fmt,
                                                number_sample_per_shard=2, extra_bad_urls=3)
        if fmt == "webdataset":
            with __import__("tarfile").open(os.path.join(src, "00001.tar")) as t:
                assert t.getmembers() == []  # what the issue describes: a tar with no members
        else:
            failed = pq.read_table(os.path.join(src, "00001.parquet")).to_pylist()
            assert len(failed) == 2 and all(r["status"] != "success" for r in failed)
        out = tmp_path / f"codes-{fmt}"
        cfg = _cfg(input=src, output=str(out), tatok=tatok_path, input_format=fmt)
        summary = run_tokenize(cfg)
        assert (summary.shards_done, summary.shards_failed, summary.shards_empty, summary.samples_ok) == (2, [], 1, 1)
        manifest = json.loads((out / "_manifest" / "00001.json").read_text())
        assert manifest["counts"] == {"samples_in": 0, "ok": 0, "failed": 0, "failed_by_reason": {}}
        assert read_code_shard(str(out / "codes" / "00001.parquet")).num_rows == 0
        assert "empty shards (no samples; written, with a manifest saying 0): 1" in summary.render()
        if fmt == "webdataset":  # the rerun's planning is the same for both formats
            again = run_tokenize(cfg)
            assert (again.shards_skipped, again.shards_done, again.shards_failed) == (2, 0, [])

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # the fake captioner loads nothing; the facts hash the folder
    cap_cfg = CaptionConfig(input=str(tmp_path / "codes-webdataset"), output=str(tmp_path / "captions"),
                            model=str(model), progress_every_s=0)
    captions = run_caption(cap_cfg, captioner_cls=slowstages.FakeCaptioner)
    assert (captions.shards_done, captions.shards_failed, captions.shards_empty, captions.samples_ok) == (2, [], 1, 1)
    assert pq.read_table(tmp_path / "captions" / "captions" / "00001.parquet").num_rows == 0
    manifest = json.loads((tmp_path / "captions" / "_manifest" / "00001.json").read_text())
    assert manifest["counts"]["samples_in"] == 0
    again = run_caption(cap_cfg, captioner_cls=slowstages.FakeCaptioner)
    assert (again.shards_skipped, again.shards_done) == (2, 0)


# ----------------------------------------------------------------------------------------------------------
# Retries only for what can be transient


class _BreakingFS:
    """Local files whose reads raise `error` (an instance) from byte `at` on, every time."""

    def __init__(self, error: BaseException, at: int):
        self.error, self.at, self.opens = error, at, 0

    def open(self, path, mode="rb", **kw):
        self.opens += 1
        fs = self

        class F:
            def __init__(self):
                self.f = open(path, "rb")

            def seek(self, pos, whence=0):
                return self.f.seek(pos, whence)

            def read(self, n=-1):
                if self.f.tell() + (n if n >= 0 else 1 << 40) > fs.at:
                    raise fs.error
                return self.f.read(n)

            def close(self):
                self.f.close()
        return F()

    def size(self, path):
        return os.path.getsize(path)


@pytest.fixture
def tar_of_photos(tmp_path):
    path = tmp_path / "00000.tar"
    members = []
    for i, (_, data, cap) in enumerate(shardmaker.sample_images()[:3]):
        members += [(f"{i:06d}.jpg", data), (f"{i:06d}.txt", cap.encode())]
    shardmaker.write_tar(str(path), members)
    return i2d.ShardInput(path=str(path), name="00000", format="webdataset", size=os.path.getsize(path))


def test_a_programming_error_fails_the_shard_at_once_and_link_errors_are_retried(tar_of_photos, monkeypatch):
    import aiohttp

    retry = i2d.ReadRetry(attempts=3, backoff_s=0.001, max_backoff_s=0.002)

    def reading_with(error):
        fs = _BreakingFS(error, at=tar_of_photos.size // 2)
        monkeypatch.setattr(storage, "filesystem", lambda p: (fs, str(p)))
        return fs

    for bug in (TypeError("unsupported operand type(s)"), KeyError("offset")):
        fs = reading_with(bug)
        with pytest.raises(i2d.ShardReadError) as e:
            i2d.read_all(tar_of_photos, retry=retry)
        assert e.value.reason == "unexpected_error" and e.value.__cause__ is bug
        assert fs.opens == 1  # not one retry (each retry reopens the file)

    transient = [ConnectionResetError(104, "Connection reset by peer"), TimeoutError("read timed out"),
                 aiohttp.ClientPayloadError("Response payload is not completed"),  # what s3fs lets through
                 _raised_while_handling(IndexError("pop from an empty deque"), ConnectionResetError(104, "reset"))]
    for error in transient:
        fs = reading_with(error)
        with pytest.raises(i2d.ShardReadError) as e:
            i2d.read_all(tar_of_photos, retry=retry)
        assert e.value.reason == "read_failed" and fs.opens == retry.attempts

    # in the job's reader stage: the shard's failed row names the error and carries the worker's traceback
    from tarflow.pipelines.image_stages import ShardReader

    reading_with(TypeError("unsupported operand type(s)"))
    rows = pa.concat_tables(ShardReader()(pa.Table.from_pylist([{
        "path": tar_of_photos.path, "name": "00000", "format": "webdataset", "size": tar_of_photos.size}]))).to_pylist()
    assert rows[-1]["kind"] == "failed" and "end" not in [r["kind"] for r in rows]  # the shard fails whole
    info = json.loads(rows[-1]["end_info"])
    assert info["reason"] == "unexpected_error" and "TypeError: unsupported operand type(s)" in info["detail"]
    assert info["traceback"].startswith("Traceback") and "TypeError: unsupported operand type(s)" in info["traceback"]


# ----------------------------------------------------------------------------------------------------------
# A poisoned accelerator


@pytest.mark.cluster  # fault injection: 4 actor restarts, each loading the model again (9.8 min at a load of 50)
def test_a_poisoned_accelerator_restarts_its_actor_and_only_the_row_that_poisons_it_fails(ray_local, tmp_path,
                                                                                          tatok_path):
    """A sticky CUDA error (injected on CPU): once in the batch holding row B, and whenever row A runs. The actor
    ends and Ray restarts it; B's batch runs again and is written; A's batch runs twice, then a row at a time,
    and A alone is recorded failed (device_error). Every other row is written once."""
    src = tmp_path / "in"
    from tarflow.data.sample import sample_photos, write_img2dataset_shards

    write_img2dataset_shards(src, sample_photos()[:6], samples_per_shard=3)  # 2 shards of 3
    keys = {}
    for name in ("00000", "00001"):
        with __import__("tarfile").open(src / f"{name}.tar") as t:
            keys[name] = sorted({m.name.split(".")[0] for m in t.getmembers()})
    always, once = keys["00000"][1], keys["00001"][0]
    log, out = tmp_path / "encoded.jsonl", tmp_path / "out"
    summary = run_tokenize(_cfg(input=str(src), output=str(out), tatok=tatok_path, num_encoders=1),
                           encoder_cls=slowstages.EncoderPoisoningTheDevice,
                           encoder_kwargs={"always": always, "once": once, "marker": str(tmp_path / "once"),
                                           "log": str(log)})
    assert summary.shards_done == 2 and summary.shards_failed == []
    assert (summary.samples_in, summary.samples_ok, summary.samples_failed) == (6, 5, 1)
    assert dict(summary.failed_by_reason) == {"device_error": 1}
    assert summary.extra["batches_that_poisoned_the_accelerator"] == 2
    written, failed = [], []
    for name in ("00000", "00001"):
        written += pq.read_table(out / "codes" / f"{name}.parquet").column("key").to_pylist()
        failed += pq.read_table(out / "errors" / f"{name}.parquet").to_pylist()
    assert sorted(written) == sorted(k for ks in keys.values() for k in ks if k != always)  # once each
    assert [(r["key"], r["reason"], r["stage"]) for r in failed] == [(always, "device_error", "encode")]
    pids = {json.loads(line)["pid"] for line in log.read_text().splitlines()}
    assert len(pids) >= 2  # the actor was restarted


def test_device_poisoning_is_told_from_other_errors():
    assert sharded.is_device_poisoning(RuntimeError("CUDA error: device-side assert triggered"))
    assert sharded.is_device_poisoning(type("AcceleratorError", (RuntimeError,), {})("anything"))
    assert not sharded.is_device_poisoning(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not sharded.is_device_poisoning(KeyError("CUDA"))
    assert not sharded.is_device_poisoning(ValueError("shapes do not match"))


# ----------------------------------------------------------------------------------------------------------
# A starved job ends; the start-up check refuses only what cannot run


def test_a_job_without_rows_while_the_cluster_does_not_grow_is_ended_naming_resources_and_flags():
    import time

    fixed = lambda: ({"CPU": 0.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0})  # noqa: E731
    started = time.monotonic()
    with pytest.raises(sharded.JobStalled) as e:
        with sharded.StallWatch("tokenize", 0, fixed, stall_timeout_s=0.6):
            time.sleep(120)  # what the driver does: wait on Ray Data (the watch interrupts the wait)
    assert time.monotonic() - started < 100
    text = "\n".join(e.value.lines)
    assert "tokenize: no rows for" in text and "the cluster did not grow" in text
    assert "CPU 0 free of 1, GPU 1 free of 1" in text
    assert "--min-encoders" in text and "--cpus-per-encoder" in text and "--stall-timeout" in text
    assert isinstance(e.value, runtime.usage_errors(()))  # exit status 2, one line per point

    # a cluster that grows (an autoscaler adding nodes) is waited for; rows arriving keep the job going
    sizes = iter(range(1, 10_000))

    def growing():
        n = float(next(sizes))
        return {"CPU": 0.0}, {"CPU": n}

    with sharded.StallWatch("caption", 0, growing, stall_timeout_s=0.4) as grows:
        time.sleep(2.0)
    assert grows.stalled is None
    with sharded.StallWatch("caption", 0, fixed, stall_timeout_s=0.4) as busy:
        for _ in range(20):
            time.sleep(0.1)
            busy.beat()
    assert busy.stalled is None


def test_gpu_actors_are_not_counted_against_cpu_only_nodes_and_unknown_autoscaler_limits_warn(monkeypatch, caplog):
    from tarflow.preflight import UsageError

    monkeypatch.setattr(pools, "autoscaler_max_resources", lambda: {})
    gpu_pool = sharded.PoolPlan(gpus_per_worker=1.0, min_workers=2, max_workers=2)
    cpu_pool = sharded.PoolPlan(gpus_per_worker=0.0, min_workers=2, max_workers=2)
    # a 1-CPU head and no GPU node up yet: GPU encoders will sit on the GPU nodes, with those nodes' CPUs
    monkeypatch.setattr(pools, "_cpus_by_node_kind", lambda: (1.0, 0.0))
    monkeypatch.setattr(pools, "autoscaler_running", lambda: False)
    sharded.check_pool_leaves_cpus(gpu_pool, 1.0, 1.0, "--min-encoders", "--cpus-per-encoder")
    with pytest.raises(UsageError):  # the same pool on CPUs cannot run there
        sharded.check_pool_leaves_cpus(cpu_pool, 0.5, 0.75, "--min-encoders", "--cpus-per-encoder")
    # GPU nodes whose CPUs the encoders take, and no CPU-only node: nothing left for the tasks
    monkeypatch.setattr(pools, "_cpus_by_node_kind", lambda: (0.0, 2.0))
    with pytest.raises(UsageError, match="GPU nodes' CPUs"):
        sharded.check_pool_leaves_cpus(gpu_pool, 1.0, 0.25, "--min-encoders", "--cpus-per-encoder")
    # an autoscaler whose limits cannot be read (the v1 autoscaler): a warning, the job goes on
    monkeypatch.setattr(pools, "autoscaler_running", lambda: True)
    with caplog.at_level(logging.WARNING, logger="tarflow"):
        sharded.check_pool_leaves_cpus(gpu_pool, 1.0, 0.25, "--min-encoders", "--cpus-per-encoder")
    assert "its limits cannot be read, so the job goes on" in caplog.text


# ----------------------------------------------------------------------------------------------------------
# Ray's own lines stay off a job's output


def test_what_ray_prints_on_the_driver_goes_to_the_job_log_without_control_codes(ray_local, capfd):
    """The raylet and GCS errors that Ray's listener thread prints (colourised, even without log_to_driver) and
    worker lines (log_to_driver) reach the job's log file, not stdout/stderr; the `ray` logger too."""
    import ray._private.worker as ray_worker

    path = runtime.open_job_log("test")
    runtime.route_ray_output_to_job_log()
    capfd.readouterr()
    line = "Task MapWorker.submit failed: the actor was killed by ray.kill (injected line)"
    ray_worker.print_to_stdstream({"lines": [line], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    ray_worker.print_to_stdstream({"lines": ["\x1b[33mworker says hi\x1b[0m\r"], "pid": 4242, "is_err": True,
                                   "ip": "127.0.0.1", "actor_name": "MapWorker(X)"}, ignore_prefix=False)
    logging.getLogger("ray.some_module").warning("a warning from Ray's own logger")
    logging.getLogger("ray.data._internal.some_module").warning("a warning from Ray Data")
    logging.getLogger("a.library").warning("\x1b[33mHEAD /bucket HTTP/1.1\x1b[0m 404")  # its colours too
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)
    logged = open(path).read()
    assert f"(raylet) {line}" in logged and "(MapWorker(X) pid=4242, ip=127.0.0.1) worker says hi" in logged
    assert "a warning from Ray's own logger" in logged and "a warning from Ray Data" in logged
    assert "\x1b" not in logged and "\r" not in logged and "HEAD /bucket HTTP/1.1 404" in logged


def test_sigterm_while_ray_starts_is_an_interrupt_and_a_slow_start_is_tried_again(monkeypatch, capsys):
    """`ray job stop` while ray.init runs (its own handler exits 15) ends like any interrupt: 143 and its line.
    A node that misses Ray's 30 s registration window on a busy machine is started again."""
    import signal

    import ray

    calls = []

    def init(*a, **kw):
        calls.append(kw)
        if len(calls) == 1:
            raise Exception("The current node timed out during startup. This could happen because ...")
        raise SystemExit(signal.SIGTERM)  # what ray.init's own SIGTERM handler does

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    rc = runtime.run_job(lambda cfg: None, None, None, start=lambda: runtime.init_ray(num_cpus=1), job="t")
    assert rc == 143 and len(calls) == 2
    assert "interrupted (SIGTERM) before any shard was written" in capsys.readouterr().err
