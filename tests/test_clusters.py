"""Multi-node behaviour on simulated clusters (marked `cluster`: minutes each; `.ci/run` runs them after the
main suite). Each scenario runs in its own process (tests/cluster_scenarios.py), since a process joins one
Ray cluster and this session's tests share one local Ray."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster
HERE = Path(__file__).resolve().parent


def _scenario(name: str, work: Path, timeout: int = 600) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    proc = subprocess.Popen([sys.executable, str(HERE / "cluster_scenarios.py"), name, str(work)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the scenario ends its cluster's processes (by PID) before it exits
        try:
            stdout, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        raise AssertionError(f"scenario {name} ran past {timeout} s", stdout[-3000:], stderr[-3000:]) from None
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (stdout[-3000:], stderr[-3000:])
    return json.loads(lines[-1][len("RESULT "):])


def test_a_worker_node_removed_mid_job_loses_and_duplicates_nothing(tmp_path):
    r = _scenario("node-removal", tmp_path)
    assert r["removed_after_manifests"] is not None and r["removed_after_manifests"] < 6
    assert r["first_error"] is None and r["first"] == {"done": 6, "failed": {}}  # the job itself survived it
    assert r["rerun_failed"] == [] and r["rerun_done"] + r["rerun_skipped"] == 6
    assert r["identical"] and r["rows"] == r["unique_keys"] == r["clean_rows"] == 36
    assert not r["parts_left"]


def test_gpu_encoders_start_on_an_autoscaling_cluster_with_no_gpu_node_up(tmp_path):
    r = _scenario("autoscaling", tmp_path)
    assert r["gpus_at_start"] == 0
    assert r["done"] == 16 and r["failed"] == []
    assert r["head_node"] not in r["encoder_nodes"]  # the encoders ran on the GPU nodes the autoscaler added
    assert len(r["encoder_nodes"]) == 2  # the pool grew past 1 (its first actor holds until a second node logs)
    assert all(ids != "[]" for ids in r["encoder_gpu_ids"])
    assert r["gpus_at_end"] >= 1


def test_the_readme_command_for_an_autoscaling_cluster_with_a_1_cpu_head_runs(tmp_path):
    """`--gpus-per-encoder 1 --num-encoders 2` with the CPU settings at their defaults on a 1-CPU head (issue 21:
    it was refused at start, the check counting the GPU encoders' CPUs against the head's): the job runs its
    encoders on the GPU nodes the autoscaler adds (never on the head), every shard is written. Whether the
    second GPU node comes up before the 8 shards are done depends on the machine's speed (seen: 1 node under
    load), so the pool's growth to 2 is asserted by the scenario above, whose encoder is slowed down."""
    r = _scenario("autoscaling-defaults", tmp_path)
    assert r["gpus_at_start"] == 0 and r["offered"] == {}  # the v1 autoscaler's limits cannot be read
    assert r["done"] == 8 and r["failed"] == []
    assert r["head_node"] not in r["encoder_nodes"] and 1 <= len(r["encoder_nodes"]) <= 2
    assert all(ids != "[]" for ids in r["encoder_gpu_ids"])
