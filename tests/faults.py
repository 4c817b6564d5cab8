"""Fault injection for the training tests: a Ray Train worker process that dies once, mid-run."""
from __future__ import annotations

import os
import time


def die_once_after_report(train_loop, config: dict) -> None:
    """Run `train_loop(config)`, but exit this worker process right after it reports step
    config["die_after_step"], the first time only (config["marker"], a file, records that it happened).

    config["die_wait_s"]: seconds to wait before dying. A report waits in the worker until Ray Train's
    controller polls it; dying at once can lose it (and the checkpoint it carries), and Ray Train then restarts
    from the checkpoint before.
    """
    import tarflow.train.core as core

    real = core.report

    def report(metrics, *args, **kwargs):
        real(metrics, *args, **kwargs)
        if metrics["step"] == config["die_after_step"] and not os.path.exists(config["marker"]):
            open(config["marker"], "w").close()
            time.sleep(config.get("die_wait_s", 0))
            os._exit(1)

    core.report = report  # the trainer core's loop looks `report` up in tarflow.train.core at every call
    train_loop(config)


def sigterm_when(argv: list[str], ready, env: dict | None = None, wait_s: float = 300.0,
                 exit_s: float = 120.0) -> tuple[int, str, str]:
    """Start `argv`, wait (at most `wait_s`) until `ready()` is true, send SIGTERM (what `ray job stop` sends),
    and return (exit status, stdout, stderr). Fails if the process ended before it was ready."""
    import signal
    import subprocess

    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + wait_s
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=exit_s)
    return proc.returncode, stdout, stderr
