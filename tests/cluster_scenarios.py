"""Multi-node scenarios on this machine, each in its own process (a process joins one Ray cluster):

    python tests/cluster_scenarios.py node-removal WORKDIR     # ray.cluster_utils.Cluster, a node removed mid-job
    python tests/cluster_scenarios.py autoscaling WORKDIR      # fake_multinode autoscaler, GPU nodes from 0
    python tests/cluster_scenarios.py autoscaling-defaults WORKDIR   # the same, the job's CPU settings at defaults

Each prints one JSON line of findings (prefixed `RESULT `) for tests/test_clusters.py to assert on. Every
node listens on 127.0.0.1 with its own ports and temp dir; clusters are ended by their own PIDs, never by
`ray stop` (it would end every Ray on the machine).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def short_temp_dir() -> str:
    """Ray's temp dir: its sockets' paths must stay under the 107 characters of AF_UNIX (pytest's tmp_path does
    not)."""
    import tempfile

    return tempfile.mkdtemp(prefix="tfray-", dir="/tmp")


def make_shards(folder: Path, n_shards: int, per_shard: int) -> str:
    """img2dataset-style tars from the bundled photos (unique keys per shard)."""
    from tarflow.data.sample import sample_photos

    photos = sample_photos()
    folder.mkdir(parents=True, exist_ok=True)
    k = 0
    for s in range(n_shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                name, jpg, caption = photos[k % len(photos)]
                key = f"{s:05d}{i:04d}"
                for suffix, data in (("jpg", jpg), ("txt", caption.encode()), ("json", b'{"url": null}')):
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, __import__("io").BytesIO(data))
                k += 1
    return str(folder)


def codes_of(output: str) -> dict:
    import pyarrow.parquet as pq

    out = {}
    for p in sorted(Path(output, "codes").glob("*.parquet")):
        t = pq.read_table(p)
        out[p.stem] = list(zip(t.column("key").to_pylist(), t.column("tatok_s1").to_pylist()))
    return out


def node_removal(work: Path) -> dict:
    """Head (driver only) + 2 worker nodes; once the first shard is written, one worker node is removed. The
    job goes on (Ray retries, actors restart) or, if it cannot, a rerun finishes it; either way the output
    equals a clean run's: every sample once."""
    import threading

    import ray
    from ray.cluster_utils import Cluster

    from tarflow.models.demo import ensure_random_tatok
    from tarflow.pipelines.tokenize import TokenizeConfig, run_tokenize

    shards = make_shards(work / "in", 6, 6)
    tatok = str(ensure_random_tatok())
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=0, gcs_server_port=free_port(), node_ip_address="127.0.0.1", include_dashboard=False,
        object_store_memory=200 << 20, temp_dir=short_temp_dir()))
    # 2 CPUs per node: after the loss, the surviving node still has room for the reader, decoder and writer
    # tasks beside both encoders (0.5 CPU each, restarted there by Ray). With 1 CPU per node the restarted
    # encoders took the whole survivor (0 CPU available was observed right after the removal), and a run could
    # wait forever on tasks that had no CPU left: a starved cluster, not the node loss this scenario is about.
    doomed = cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1", object_store_memory=200 << 20)
    cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1", object_store_memory=200 << 20)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        from slowstages import SlowEncoder

        def cfg(out):
            return TokenizeConfig(input=shards, output=str(out), tatok=tatok, scales=[1], encode_batch_size=2,
                                  decode_batch_size=2, read_chunk=2, progress_every_s=0, cpus_per_encoder=0.5,
                                  decode_cpus=0.25, num_encoders=2)

        out = work / "out"
        removed = {}

        def remove_when_first_shard_is_written():
            deadline = time.time() + 120
            while time.time() < deadline and not list((out / "_manifest").glob("*.json")):
                time.sleep(0.05)
            removed["after_manifests"] = len(list((out / "_manifest").glob("*.json")))
            cluster.remove_node(doomed, allow_graceful=False)
            removed["at"] = time.time()

        t = threading.Thread(target=remove_when_first_shard_is_written, daemon=True)
        t.start()
        first_error = None
        try:
            first = run_tokenize(cfg(out), encoder_cls=SlowEncoder, encoder_kwargs={"delay_s": 0.3})
            first_summary = {"done": first.shards_done, "failed": first.failed_shard_reasons}
        except Exception as e:  # noqa: BLE001 - reported: the rerun below must finish the job either way
            first_error, first_summary = f"{type(e).__name__}: {str(e)[:300]}", None
        t.join(timeout=130)
        rerun = run_tokenize(cfg(out))
        clean = run_tokenize(cfg(work / "clean"))
        a, b = codes_of(str(out)), codes_of(str(work / "clean"))
        n_rows = sum(len(v) for v in a.values())
        return {"removed_after_manifests": removed.get("after_manifests"), "first": first_summary,
                "first_error": first_error, "rerun_done": rerun.shards_done, "rerun_skipped": rerun.shards_skipped,
                "rerun_failed": rerun.shards_failed, "identical": a == b, "rows": n_rows,
                "unique_keys": len({k for v in a.values() for k, _ in v}), "clean_rows": clean.samples_ok,
                "parts_left": (out / "_parts").exists()}
    finally:
        ray.shutdown()
        cluster.shutdown()


def autoscaling_defaults(work: Path) -> dict:
    """The same cluster, and the job as the README gives it for such a cluster: `--gpus-per-encoder 1
    --num-encoders 2`, every CPU setting at its default (1 CPU per encoder, 1 per decode task). The start-up check
    must let it run (the encoders take the GPU nodes' CPUs, not the head's), and it must finish."""
    return autoscaling(work, defaults=True)


def autoscaling(work: Path, defaults: bool = False) -> dict:
    """A head with 1 CPU and no GPU, and a node type declaring {CPU: 1, GPU: 1} with min 0, max 2, started by
    the fake_multinode autoscaler on demand. Asked for GPU encoders (`--gpus-per-encoder 1 --num-encoders 2`,
    as `--device cuda` does), the job requests them although no GPU is up at start; the autoscaler adds GPU
    nodes, the encoders land there, and the pool grows past 1. (The fake nodes have no CUDA: the encoders'
    torch device stays auto, i.e. CPU.) The v1 autoscaler publishes no node types to the GCS, so `offered` is
    reported as found; with autoscaler v2 / KubeRay it lets `--device auto` see GPUs too.)"""
    port = free_port()
    ray_tmp = short_temp_dir()
    config = {
        "cluster_name": "tarflow-fake", "max_workers": 2, "head_node_type": "ray.head.default",
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{port}"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "gpu": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 5, "docker": {}, "initialization_commands": [],
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {},
        "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    }
    (work / "autoscaling.json").write_text(json.dumps(config))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    if os.environ.get("TARFLOW_AUTOSCALER_V2") == "1":
        fake_head = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"
        config["provider"].update(launch_multiple=True, head_node_id=fake_head)
        (work / "autoscaling.json").write_text(json.dumps(config))
        env.update(RAY_enable_autoscaler_v2="1", RAY_CLOUD_INSTANCE_ID=fake_head,
                   RAY_OVERRIDE_NODE_ID_FOR_TESTING=fake_head)
    ray_bin = str(Path(sys.executable).with_name("ray"))
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=1", "--include-dashboard=false", f"--dashboard-agent-listen-port={free_port()}",
         f"--ray-client-server-port={free_port()}", f"--temp-dir={ray_tmp}", "--object-store-memory=200000000",
         f"--autoscaling-config={work / 'autoscaling.json'}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    import ray

    try:
        deadline = time.time() + 300  # a busy machine starts the head slowly
        while True:
            try:
                ray.init(address=f"127.0.0.1:{port}", log_to_driver=False)
                break
            except Exception:  # noqa: BLE001 - the head is still starting
                if time.time() > deadline:
                    raise
                time.sleep(1)
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        from slowstages import EncoderReportingPlacement

        from tarflow.models.demo import ensure_random_tatok
        from tarflow.pipelines.ray_private import autoscaler_max_resources
        from tarflow.pipelines.sharded import plan_pool
        from tarflow.pipelines.tokenize import TokenizeConfig, run_tokenize

        gpus_at_start = ray.cluster_resources().get("GPU", 0)
        offered = autoscaler_max_resources()
        pool = plan_pool("auto")
        if os.environ.get("TARFLOW_PROBE_ONLY"):
            return {"gpus_at_start": gpus_at_start, "offered": offered}
        shards = make_shards(work / "in", 8 if defaults else 16, 6)
        placements = work / "placements.txt"
        cpus = {} if defaults else {"cpus_per_encoder": 0.25, "decode_cpus": 0.25}
        summary = run_tokenize(
            TokenizeConfig(input=shards, output=str(work / "out"), tatok=str(ensure_random_tatok()), scales=[1],
                           encode_batch_size=2, decode_batch_size=2, read_chunk=2, progress_every_s=0,
                           gpus_per_encoder=1.0, num_encoders=2, stall_timeout_s=300, **cpus,
                           encoder_memory=0),  # the fake node type declares no memory: a reservation would hang
            encoder_cls=EncoderReportingPlacement, encoder_kwargs={"log": str(placements), "delay_s": 1.0,
                                                                   "hold_until_nodes": 0 if defaults else 2})
        lines = [json.loads(x) for x in placements.read_text().splitlines()]
        return {"gpus_at_start": gpus_at_start, "offered": offered, "pool": [pool.gpus_per_worker, pool.min_workers,
                                                                            pool.max_workers],
                "done": summary.shards_done, "failed": summary.shards_failed,
                "encoder_nodes": sorted({x["node"] for x in lines}),
                "encoder_gpu_ids": sorted({str(x["gpu_ids"]) for x in lines}),
                "head_node": ray.get_runtime_context().get_node_id(),
                "gpus_at_end": ray.cluster_resources().get("GPU", 0)}
    finally:
        ray.shutdown()
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        # the fake nodes' raylets were started by the head's autoscaler monitor: end them by PID too
        kill_processes_mentioning(f"127.0.0.1:{port}", ray_tmp)


def kill_processes_mentioning(*needles: str) -> None:
    """SIGKILL this user's processes whose command line holds one of `needles` (this scenario's own nodes)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(n in cmd for n in needles):
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass


if __name__ == "__main__":
    # SIGTERM (the test's timeout) unwinds through the scenarios' `finally`, which end their clusters by PID
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    scenario, workdir = sys.argv[1], Path(sys.argv[2])
    workdir.mkdir(parents=True, exist_ok=True)
    result = {"node-removal": node_removal, "autoscaling": autoscaling,
              "autoscaling-defaults": autoscaling_defaults}[scenario](workdir)
    print("RESULT " + json.dumps(result, default=str), flush=True)
