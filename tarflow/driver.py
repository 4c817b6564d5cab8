"""What every driver shares, jobs and trainers alike: checks before Ray, one-line errors, clean interrupts, exit
statuses. (Connecting to Ray and quiet logs: tarflow.pipelines.runtime.init_ray and setup_logging.)

`run_driver` runs a driver's checks (before Ray starts), then its work, and turns what can go wrong into an
exit status and a few readable lines:

    0  done          1  shards failed, or an unexpected error (one line; traceback in a log file)
    2  bad usage: arguments, paths, checkpoints, settings (one line per problem, before any work)
    130 / 143        interrupted by SIGINT / SIGTERM (Ctrl-C, `ray job stop`): the summary of what finished

The bulk jobs call it through tarflow.pipelines.runtime.run_job, the trainers through tarflow.train.cli; each
brings its own summary (how it reads, when it is a failure, what an interrupt leaves). Nothing here knows a
pipeline or a trainer.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
import traceback

log = logging.getLogger("tarflow")

# SIGINT -> 130, SIGTERM -> 143 (128 + signal number, as shells report it)
_stop_signal: dict = {"signum": None}
# whether this process started its own local Ray (its workers end with it), or joined a cluster
_private_ray: dict = {"started": False}


def started_private_ray() -> None:
    """Called once this process has started a Ray of its own (not joined a cluster)."""
    _private_ray["started"] = True


# ----------------------------------------------------------------------------------------------------------
# The job's log file

# Records for the job's log file alone (the tracebacks of failed shards, Ray's own lines): never on the output.
FILE_ONLY = logging.getLogger("tarflow.logfile")
FILE_ONLY.propagate = False
FILE_ONLY.setLevel(logging.DEBUG)
_job_log: dict = {"path": None}
_CONTROL_CODES = None


def open_job_log(job: str | None = None) -> str | None:
    """The job's log file, `$TARFLOW_HOME/logs/JOB-TIME-PID.log`, opened once per process (None if it cannot
    be written): every tarflow line, the traceback of every failed shard or batch, and what Ray prints on its
    own (worker output, raylet and GCS errors, the `ray` logger), which stays off the job's output."""
    if _job_log["path"]:
        return _job_log["path"]
    from tarflow.data.storage import tarflow_home

    job = job or os.path.splitext(os.path.basename(sys.argv[0] or ""))[0] or "tarflow"
    try:
        folder = tarflow_home() / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{job}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError:
        return None
    handler.setFormatter(_PlainFormatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    FILE_ONLY.addHandler(handler)
    _job_log["path"] = str(path)
    return _job_log["path"]


class _PlainFormatter(logging.Formatter):
    """The job log is read with less, grep and editors: no library's colours (Ray's, werkzeug's) reach it."""

    def format(self, record: logging.LogRecord) -> str:
        return without_control_codes(super().format(record))


def job_log_path() -> str | None:
    return _job_log["path"]


def without_control_codes(text: str) -> str:
    """`text` without terminal control sequences (colours, cursor moves) and carriage returns."""
    import re

    global _CONTROL_CODES
    if _CONTROL_CODES is None:
        _CONTROL_CODES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]|[\r\x00-\x08\x0b-\x1f\x7f]")
    return _CONTROL_CODES.sub("", text)


# ----------------------------------------------------------------------------------------------------------
# Interrupts


def install_signal_handlers() -> dict:
    """SIGINT and SIGTERM (Ctrl-C, `ray job stop`) raise KeyboardInterrupt in the main thread; the signal is kept
    for the exit status. The pipelines catch it, stop, and return what they finished. Returns the handlers it
    replaced (none outside the main thread)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}

    def stop(signum, frame):
        if _stop_signal["signum"] is not None:  # a second Ctrl-C while stopping: stop now
            os._exit(128 + signum)
        _stop_signal["signum"] = signum
        raise KeyboardInterrupt(signal.Signals(signum).name)

    return {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}


def interrupted_exit_code() -> int:
    return 128 + (_stop_signal["signum"] or signal.SIGINT)


# ----------------------------------------------------------------------------------------------------------
# Errors


def root_cause(e: BaseException) -> BaseException:
    """The exception a job's code raised, out of Ray's wrappers (RayTaskError, Ray Data's UserCodeException,
    ActorDiedError, Ray Train's WorkerGroupError and ControllerError, ...): Ray's own errors are followed
    through `.cause`, `__cause__` and `__context__`, Ray Train's through the failed workers (lowest rank first)
    and the controller's failure."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        nxt = None
        if _is_ray_error(e):
            cause = getattr(e, "cause", None)
            nxt = cause if isinstance(cause, BaseException) else (e.__cause__ or e.__context__)
        elif isinstance(getattr(e, "worker_failures", None), dict) and e.worker_failures:
            nxt = e.worker_failures[min(e.worker_failures)]  # Ray Train's WorkerGroupError: the lowest rank's
        elif isinstance(getattr(e, "controller_failure", None), BaseException):
            nxt = e.controller_failure  # Ray Train's ControllerError
        elif type(e).__name__ == "UserCodeException" or (type(e).__module__ or "").startswith("ray."):
            nxt = e.__cause__ or e.__context__
        if nxt is None or _is_empty_marker(nxt):
            break
        e = nxt
    return e


def _is_empty_marker(e: BaseException) -> bool:
    """Ray Data raises the user's error `from SystemException()`: an empty marker, not a cause."""
    return (type(e).__module__ or "").startswith("ray.") and not str(e) and e.__cause__ is None \
        and e.__context__ is None


def _is_ray_error(e: BaseException) -> bool:
    try:
        from ray.exceptions import RayError
    except ImportError:
        return False
    return isinstance(e, RayError)


def _named_line(e: BaseException) -> tuple[str, str] | None:
    """For Ray's own errors that carry a remote error only as text (an actor that died in its constructor):
    the last `module.SomethingError: message` line, as (class name, message)."""
    for line in reversed([ln.strip() for ln in str(e).splitlines()]):
        head, sep, message = line.partition(": ")
        name = head.rsplit(".", 1)[-1]
        if sep and head.replace(".", "").replace("_", "").isalnum() and name.endswith(("Error", "Exception")):
            return name, message
    return None


def one_line(e: BaseException) -> str:
    """`Type: message`, on one line and cut to a readable length; for Ray's own errors (an actor that died,
    a worker that crashed), the remote error their text names, else their first line."""
    from tarflow.preflight import shorten

    if _is_ray_error(e):
        named = _named_line(e)
        if named:
            return shorten(f"{named[0]}: {named[1]}")
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
        return shorten(f"{type(e).__name__}: {first}" if first else type(e).__name__)
    text = str(e).strip()
    return shorten(f"{type(e).__name__}: {text}" if text else type(e).__name__)


def is_usage_error(e: BaseException, usage: tuple) -> bool:
    """Bad input or settings, raised here or (named in a Ray error's text) in an actor."""
    if isinstance(e, usage):
        return True
    named = _named_line(e) if _is_ray_error(e) else None
    return bool(named) and named[0] in {c.__name__ for c in usage}


def write_error_log(job: str, e: BaseException) -> str | None:
    """Keep the full traceback (with Ray's remote one) in $TARFLOW_HOME/logs; return the file's path."""
    from tarflow.data.storage import tarflow_home

    text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    if job_log_path():  # the job's log file, where the rest of the run's story is
        FILE_ONLY.error("%s failed:\n%s", job, text.rstrip())
        return job_log_path()
    try:
        folder = tarflow_home() / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{job}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        path.write_text(text)
        return str(path)
    except OSError:
        return None


def usage_errors(user_errors: tuple = ()) -> tuple:
    """What counts as bad input or settings (exit 2) for every driver, and a driver's own `user_errors`."""
    from tarflow.data.schema import SchemaError
    from tarflow.models.checkpoint import CheckpointError
    from tarflow.preflight import UsageError

    return (UsageError, CheckpointError, SchemaError, FileNotFoundError, PermissionError, NotADirectoryError,
            IsADirectoryError, ValueError, *user_errors)


def print_usage_error(e: BaseException) -> None:
    from tarflow.preflight import shorten

    lines = getattr(e, "lines", None) or [ln for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
    for line in lines:
        print(f"error: {shorten(line)}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------
# Running a driver


def run_driver(run, cfg, summary_json: str | None, *, report, job: str, user_errors: tuple = (), check=None,
               start=None, interrupted_early=None) -> int:
    """Check, start Ray, run, report; return the exit status.

    `check()` runs first, on the driver, before Ray starts or a model loads: it raises preflight.UsageError with
    every problem found. `start()` connects to Ray. `run(cfg)` returns the summary; `report(summary)` prints it
    and returns the exit status (130/143 from `interrupted_exit_code()` when the summary says it was stopped);
    the summary is also kept as JSON at `summary_json` (`summary.as_dict()`). Errors of the driver's own (bad
    input or settings) and errors that Ray brings back from an actor, task or training worker are printed as one
    line each (the traceback goes to a log file whose path is printed). An interrupt that reaches here (before
    `run` could return a summary) prints `interrupted_early()`'s line, or a generic one.
    """
    _stop_signal["signum"] = None
    previous = install_signal_handlers()
    try:
        return _run_driver(run, cfg, summary_json, report, job, usage_errors(user_errors), check, start,
                           interrupted_early)
    finally:
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)


def pin_hub_paths(cfg) -> None:
    """Pin the config's hf:// paths to the commits they resolve to now, on the driver, so that every worker reads
    the same files and the outputs' facts name the commit; raises preflight.UsageError with a line per path that
    cannot be used (missing repo, revision or file, a gated repo without access, an empty offline cache)."""
    from tarflow.data import hub
    from tarflow.preflight import UsageError

    problems = hub.pin_fields(cfg)
    if problems:
        raise UsageError(problems)


def _stop_ray_work() -> None:
    """A job's private Ray (the job run as a script) stops before its interrupt line is read: a training worker
    still running would write a checkpoint after the line named the one before it, and the rerun would not resume
    where the line said. A driver that joined a cluster leaves it up (its own workers end when it exits)."""
    ray = sys.modules.get("ray")
    if _private_ray["started"] and ray is not None and ray.is_initialized():
        ray.shutdown()
        _private_ray["started"] = False


def _run_driver(run, cfg, summary_json, report, job, usage, check, start, interrupted_early) -> int:
    try:
        pin_hub_paths(cfg)
        if check is not None:
            check()
        if start is not None:
            start()
            install_signal_handlers()  # again: ray.init installs its own SIGTERM handler (sys.exit)
        summary = run(cfg)
    except KeyboardInterrupt:
        code = interrupted_exit_code()
        name = signal.Signals(code - 128).name
        line = None
        try:
            _stop_ray_work()
            line = interrupted_early() if interrupted_early is not None else None
        except Exception as e:  # noqa: BLE001 - the line is a courtesy; the exit status is what matters
            log.debug("no interrupt summary: %s", e)
        print(f"tarflow {job}: interrupted ({name}) " + (line or "before it finished; rerun the same command"),
              file=sys.stderr)
        return code
    except usage as e:  # raised on the driver: the message is already the one line to show
        print_usage_error(e)
        return 2
    except Exception as e:  # a worker, actor or task failed, or something unexpected: one line + the traceback's file
        cause = root_cause(e)
        path = write_error_log(job, e)
        where = f" (traceback: {path})" if path else ""
        print(f"error: {one_line(cause)}{where}", file=sys.stderr)
        return 2 if is_usage_error(cause, usage) else 1
    code = report(summary)
    if summary_json:
        import json

        from tarflow.data import storage

        storage.write_bytes_atomic(summary_json, json.dumps(summary.as_dict(), indent=2, default=str).encode())
    return code
