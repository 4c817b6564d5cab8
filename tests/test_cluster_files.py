"""The cluster launch files stay in step with the job they run."""
from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _job_parser():
    spec = importlib.util.spec_from_file_location("tokenize_laion", REPO / "jobs" / "tokenize_laion.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


def test_rayjob_entrypoint_runs_the_tokenize_job_with_valid_arguments():
    doc = yaml.safe_load((REPO / "cluster" / "rayjob-tokenize.yaml").read_text())
    assert doc["kind"] == "RayJob" and doc["spec"]["shutdownAfterJobFinishes"] is True
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/tokenize_laion.py"] and (REPO / argv[1]).exists()
    args = _job_parser().parse_args(argv[2:])
    assert args.input and args.output.startswith("s3://") and args.scales == [1, 2, 3]
    workers = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1" and workers["maxReplicas"] >= workers["minReplicas"]
    yaml.safe_load(doc["spec"]["runtimeEnvYAML"])


def test_ray_up_yaml_has_a_gpu_worker_type_that_autoscales():
    doc = yaml.safe_load((REPO / "cluster" / "ray-cluster.yaml").read_text())
    workers = {k: v for k, v in doc["available_node_types"].items() if k != doc["head_node_type"]}
    assert len(workers) == 1
    (w,) = workers.values()
    assert w["min_workers"] < w["max_workers"] <= doc["max_workers"]
    assert any("pip install" in c and "tarflow" in c for c in doc["setup_commands"])
    assert yaml.safe_load((REPO / "cluster" / "runtime-env.yaml").read_text())["env_vars"]
