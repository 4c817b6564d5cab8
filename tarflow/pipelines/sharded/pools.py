"""Actor pools that follow the cluster: `plan_pool` sizes a job's autoscaling pool from what the cluster has
or its autoscaler can add (GPU actors even with no GPU node up yet); `check_pool_leaves_cpus` refuses, before
the job starts, a pool minimum that would leave no CPU for the reading, decoding and writing tasks."""
from __future__ import annotations

import logging
from dataclasses import dataclass

# the autoscaler's limits, which no public Ray API gives: one module holds every private Ray name tarflow uses
from tarflow.pipelines.ray_private import autoscaler_max_resources, autoscaler_running
from tarflow.preflight import UsageError

log = logging.getLogger("tarflow")


@dataclass
class PoolPlan:
    gpus_per_worker: float
    min_workers: int
    max_workers: int

    @property
    def concurrency(self) -> tuple[int, int]:
        return (self.min_workers, self.max_workers)


def plan_pool(device: str = "auto", gpus_per_worker: float | None = None, min_workers: int | None = None,
              max_workers: int | None = None) -> PoolPlan:
    """The accelerator request and the bounds of an autoscaling actor pool, from what the cluster can offer,
    not from what happens to be up now: an autoscaling cluster that starts with 0 GPU nodes still gets GPU
    actors (the pending actors make the autoscaler add nodes), and the pool grows to every GPU the
    autoscaler's node types can offer.

    GPUs are requested when `gpus_per_worker` > 0, `device` is cuda, or (device auto) the cluster has or can
    add GPUs."""
    import ray

    present = ray.cluster_resources().get("GPU", 0)
    offered = autoscaler_max_resources().get("GPU", 0)
    if gpus_per_worker is None:
        wants_gpu = device.startswith("cuda") or (device == "auto" and (present or offered))
        gpus_per_worker = 1.0 if wants_gpu else 0.0
        if not wants_gpu and device == "auto":
            log.info("no GPU in the cluster now and none declared by its autoscaler: the models run on CPU. On "
                     "an autoscaling cluster that adds GPU nodes on demand, pass --device cuda")
    if gpus_per_worker:
        cap = max(present, min(offered, 4096))
        default_max = max(1, int(cap // gpus_per_worker))
    else:
        default_max = 1
    hi = max(1, max_workers or default_max)
    lo = max(1, min(min_workers or 1, hi))
    return PoolPlan(gpus_per_worker=float(gpus_per_worker), min_workers=lo, max_workers=hi)


def check_pool_leaves_cpus(pool: PoolPlan, cpus_per_worker: float, task_cpus: float, min_flag: str,
                           cpus_flag: str) -> None:
    """Refuse a pool whose minimum takes so many CPUs that no CPU task of the job (the largest asks `task_cpus`)
    fits beside it: Ray Data starts the minimum at once and the job then waits forever, silently (reproduced:
    --min-encoders 2 x 0.5 CPU on a 1-CPU cluster never finishes; min 1, max 2 does).

    Only what cannot run is refused. Actors that need GPUs run on GPU nodes and take those nodes' CPUs: the
    CPUs of nodes without GPUs stay for the tasks. The CPUs counted are those up now or, if more, those the
    autoscaler can add. Where an autoscaler runs but its limits cannot be read (the v1 autoscaler does not
    publish them), the check cannot know what will come up: it warns, and --stall-timeout ends the job if it
    does starve."""
    if cpus_per_worker <= 0:
        return
    held = pool.min_workers * cpus_per_worker
    cpu_only, on_gpu_nodes = _cpus_by_node_kind()
    if pool.gpus_per_worker > 0:
        left = cpu_only + max(0.0, on_gpu_nodes - held)
    else:
        left = cpu_only + on_gpu_nodes - held
    limits = autoscaler_max_resources()
    if limits.get("CPU"):
        left = max(left, limits["CPU"] - held)
    if left >= task_cpus or cpu_only + on_gpu_nodes <= 0:
        return
    where = "GPU nodes' " if pool.gpus_per_worker > 0 else ""
    problem = (f"{min_flag} {pool.min_workers} x {cpus_flag} {cpus_per_worker:g} holds {held:g} of this cluster's "
               f"{where}CPUs ({cpu_only + on_gpu_nodes:g} in all, {cpu_only:g} on nodes without GPUs), leaving less "
               f"than the {task_cpus:g} that reading, decoding and writing tasks need")
    if not limits and autoscaler_running():
        log.warning("%s, counting the nodes up now; this cluster's autoscaler may add more, but its limits cannot "
                    "be read, so the job goes on (if it starves, --stall-timeout ends it)", problem)
        return
    raise UsageError([f"{problem} (the job would wait forever): lower {min_flag} or {cpus_flag}, or add CPUs"])


def _cpus_by_node_kind() -> tuple[float, float]:
    """(CPUs of the alive nodes without GPUs, CPUs of those with GPUs)."""
    import ray

    cpu_only = on_gpu = 0.0
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        if res.get("GPU", 0) > 0:
            on_gpu += res.get("CPU", 0.0)
        else:
            cpu_only += res.get("CPU", 0.0)
    return cpu_only, on_gpu
