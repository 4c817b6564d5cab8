"""StallWatch: a thread that warns when no row reached the driver for a while and, after --stall-timeout
while the cluster did not grow, ends the job (JobStalled) naming the free and total resources and the
flags to change."""
from __future__ import annotations

import logging
import time
from typing import Callable

from tarflow.preflight import UsageError

log = logging.getLogger("tarflow")


DEFAULT_STALL_TIMEOUT_S = 1800.0
# The flags that size each job's actor pool: what a stalled job's message tells to change.
POOL_FLAGS = {"tokenize": ("--min-encoders", "--cpus-per-encoder", "--gpus-per-encoder"),
              "caption": ("--min-workers", "--cpus-per-worker", "--gpus-per-worker"),
              "generate": ("--min-workers", "--cpus-per-worker", "--gpus-per-worker")}


class JobStalled(UsageError):
    """No row reached the driver for --stall-timeout seconds and the cluster did not grow meanwhile: a setting
    to change (exit status 2), one line per point."""


class StallWatch:
    """Watches that rows keep reaching the driver. A Ray Data job can wait forever on resources the cluster will
    never have: after a node loss Ray restarts the lost actors on the survivors, and if they take every CPU there
    the reader, decoder and writer tasks never run (reproduced: 2 encoders x 0.5 CPU on a 1-CPU cluster never
    finish; on 2 CPUs, 12 s); or an actor asks for a resource no node type offers. Ray logs nothing then.

    Every `after_s` without rows it warns, with the cluster's free and total resources. After `stall_timeout_s`
    without rows (0: never), if the cluster's resources did not change in that time either (no node came or
    went: an autoscaler that is adding nodes resets the clock), it ends the job: JobStalled is raised in the
    main thread (by a signal, which interrupts whatever the main thread waits on), naming the resources and the
    flags to change."""

    def __init__(self, job: str, after_s: float, resources: Callable[[], tuple[dict, dict]] | None = None,
                 stall_timeout_s: float = 0.0):
        import threading

        self.job, self.after_s, self.stall_timeout_s = job, after_s, stall_timeout_s
        self.resources = resources or _ray_resources
        self.last = time.monotonic()
        self.warnings = 0
        self.stalled: list[str] | None = None  # the message's lines, once the job is ended
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tarflow-stall-watch", daemon=True)
        self._previous_handler = None

    def __enter__(self) -> "StallWatch":
        import signal
        import threading

        if self.stall_timeout_s > 0 and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGUSR1, self._raise_stalled)
        else:
            self.stall_timeout_s = 0.0  # only the main thread can be interrupted: warn only
        if self.after_s > 0 or self.stall_timeout_s > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import signal

        self._stop.set()
        if self._previous_handler is not None:
            signal.signal(signal.SIGUSR1, self._previous_handler)
            self._previous_handler = None

    def beat(self) -> None:
        self.last = time.monotonic()

    def _raise_stalled(self, signum, frame):
        if self.stalled and not self._stop.is_set():
            raise JobStalled(self.stalled)

    def _held(self) -> tuple[str, dict | None]:
        try:
            free, total = self.resources()
            return ", ".join(f"{k} {free.get(k, 0):g} free of {total[k]:g}" for k in ("CPU", "GPU") if k in total), \
                {k: total.get(k, 0) for k in ("CPU", "GPU")}
        except Exception as e:  # noqa: BLE001 - the watch must not fail the job
            return f"resources unknown ({type(e).__name__})", None

    def _run(self) -> None:
        import signal
        import threading

        warned_at = 0.0
        sizes: list[tuple[float, dict | None]] = []  # (when, total resources) while no row arrives
        periods = [p for p in (self.after_s, self.stall_timeout_s) if p > 0]
        while not self._stop.wait(min(min(periods) / 4, 15.0)):
            now = time.monotonic()
            idle = now - self.last
            if idle < min(periods):
                sizes.clear()
                continue
            held, total = self._held()
            sizes.append((now, total))
            sizes[:] = [x for x in sizes if x[0] >= self.last]
            if self.stall_timeout_s > 0 and idle >= self.stall_timeout_s and total is not None:
                changed_at = max((t for (t, tot), (_, before) in zip(sizes[1:], sizes) if tot != before),
                                 default=self.last)
                if now - changed_at >= self.stall_timeout_s and sizes[0][0] <= now - self.stall_timeout_s * 0.5:
                    min_flag, cpus_flag, gpus_flag = POOL_FLAGS.get(self.job, ("the pool's minimum",
                                                                               "its CPUs per worker",
                                                                               "its GPUs per worker"))
                    self.stalled = [
                        f"{self.job}: no rows for {idle:.0f} s and the cluster did not grow meanwhile ({held}): "
                        "stopped; nothing is lost, rerun the same command to resume",
                        f"an actor pool may hold what the reading, decoding and writing tasks need: lower "
                        f"{min_flag} or {cpus_flag}, or add nodes; or a request no node can satisfy is pending "
                        f"(check {gpus_flag}, `ray status`)",
                        f"to wait longer: --stall-timeout SECONDS (default {DEFAULT_STALL_TIMEOUT_S:.0f}; 0: never "
                        "stop)"]
                    log.error("%s", " ".join(self.stalled))
                    signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
                    return
            if idle < self.after_s or self.after_s <= 0 or now - warned_at < self.after_s:
                continue
            warned_at = now
            self.warnings += 1
            log.warning("%s: no rows for %.0f s (%s). If nothing is free, an actor pool may hold what the other "
                        "stages need (after a node loss Ray restarts actors on the nodes left): lower the pool's "
                        "size or CPUs per worker, or add nodes; if resources are free, a request no node can "
                        "satisfy may be pending (`ray status`)", self.job, idle, held)


def _ray_resources() -> tuple[dict, dict]:
    import ray

    return ray.available_resources(), ray.cluster_resources()
