"""The README's `ray job submit` path, with the real `ray` CLI, as a user on a fresh machine runs it:

    source .venv/bin/activate                       # the cluster's Python is the one with tarflow installed
    export RAY_AUTH_MODE=token
    ray get-auth-token --generate > /dev/null       # ~/.ray/auth_token, once
    ray start --head --node-ip-address=127.0.0.1
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/tokenize_laion.py --output "$PWD/out/tokenize-submitted"
    ray job logs --address http://127.0.0.1:8265 JOB_ID

The cluster gets its own ports, temp dir and HOME, and is ended by its own process group (never `ray stop`,
which would end every Ray on the machine).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _wait_for_dashboard(url: str, head: subprocess.Popen, timeout: float = 180) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    deadline = time.time() + timeout
    while time.time() < deadline:
        if head.poll() is not None:
            raise AssertionError(f"ray start exited with {head.returncode}")
        try:
            with opener.open(f"{url}/api/version", timeout=2):
                return
        except urllib.error.HTTPError:  # it answers (401 without the token): it is up
            return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"the dashboard at {url} did not come up in {timeout} s")


def _stop(head: subprocess.Popen) -> None:
    """End the cluster through its own process group: `ray start --block` stops its processes on SIGTERM."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            return
        try:
            head.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.mark.cluster  # minutes on 2 cores: the heavier group (make test-cluster)
def test_readme_ray_job_submit_path_with_the_real_cli(tmp_path):
    bin_dir = os.path.dirname(sys.executable)
    ray = os.path.join(bin_dir, "ray")
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    env.update(HOME=str(tmp_path / "home"), PATH=bin_dir + os.pathsep + env.get("PATH", ""),  # activate
               RAY_AUTH_MODE="token",  # the README's export
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # at the end, stop at once (no 30 s drain on SIGTERM)
    os.makedirs(env["HOME"])
    temp_dir = tempfile.mkdtemp(prefix="rcli", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    gcs, dash, agent_http, agent_grpc, client, node_mgr, obj_mgr, metrics, rt_env, lo = _free_ports(10)
    subprocess.run([ray, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    head_log = open(tmp_path / "ray-start.log", "w")
    head = subprocess.Popen(
        [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--ray-client-server-port={client}", f"--node-manager-port={node_mgr}",
         f"--object-manager-port={obj_mgr}", f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_env}",
         f"--min-worker-port={lo}", f"--max-worker-port={lo + 40}", "--num-cpus=2", f"--temp-dir={temp_dir}",
         "--disable-usage-stats"],
        env=env, cwd=REPO, stdout=head_log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    out = tmp_path / "out" / "tokenize-submitted"
    try:
        _wait_for_dashboard(url, head)
        submit = subprocess.run(
            [ray, "job", "submit", "--address", url, "--submission-id", "tarflow-readme", "--working-dir", ".",
             "--", "python", "jobs/tokenize_laion.py", "--output", str(out)],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
        assert submit.returncode == 0, (submit.stdout + submit.stderr)[-4000:]
        logs = subprocess.run([ray, "job", "logs", "--address", url, "tarflow-readme"], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        assert logs.returncode == 0, logs.stderr[-2000:]
        assert "samples: 8 in = 8 ok + 0 failed" in logs.stdout and f"output: {out}" in logs.stdout
        assert "Traceback" not in logs.stdout and "core_worker.cc" not in logs.stdout
        # the outputs are where the summary says, not in Ray's copy of the working dir
        manifests = sorted(os.listdir(out / "_manifest"))
        assert manifests == ["00000.json", "00001.json"]
        assert all(json.loads((out / "_manifest" / m).read_text())["counts"]["ok"] == 4 for m in manifests)

        # a relative --output is refused with the fix, before any work
        rel = subprocess.run(
            [ray, "job", "submit", "--address", url, "--submission-id", "tarflow-relative", "--working-dir", ".",
             "--", "python", "jobs/tokenize_laion.py", "--output", "out/tokenize-sample"],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert rel.returncode != 0
        logs = subprocess.run([ray, "job", "logs", "--address", url, "tarflow-relative"], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=60).stdout
        assert "error: --output out/tokenize-sample: is relative" in logs and '--output "$PWD/out/tokenize-sample"' in logs
        assert "Traceback" not in logs
    finally:
        _stop(head)
        head_log.close()
