"""Runs tarflow job scripts one after another in one process on one private Ray, as a test tells it.

    python tests/jobrunner.py        # then, on stdin, one JSON line per job: {"job": "caption", "argv": [...]}

Answers each with one JSON line on stdout: {"rc", "stdout", "stderr"} (what the job printed). A job reads its
environment (HF_ENDPOINT, HF_HUB_OFFLINE, ...) as this process got it, and Ray's workers inherit it: this is how
tests run jobs against another environment than the test session's without paying a Ray start per job, and
change things (a Hub repo moving on) between jobs.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import sys
import time

JOBS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs")


def _job(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", os.path.join(JOBS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    import ray

    answer = sys.stdout
    for attempt in range(5):  # Ray gives its raylet 30 s to register: a loaded machine can miss that
        try:
            ray.init(address="local", num_cpus=int(os.environ.get("JOBRUNNER_CPUS", "2")), include_dashboard=False,
                     object_store_memory=256 << 20, log_to_driver=False, configure_logging=False)
            break
        except Exception as e:  # noqa: BLE001
            if "timed out during startup" not in str(e) or attempt == 4:
                raise
            ray.shutdown()
            time.sleep(10 * (attempt + 1))  # let the load that made it miss pass
    answer.write(json.dumps({"ready": True}) + "\n")
    answer.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = _job(cmd["job"]).main(cmd["argv"])
            except SystemExit as e:  # argparse
                rc = e.code
            except BaseException as e:  # noqa: BLE001 -- reported to the test, which shows it
                import traceback

                traceback.print_exc()
                rc = f"raised {type(e).__name__}"
        answer.write(json.dumps({"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}) + "\n")
        answer.flush()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
