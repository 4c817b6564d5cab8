"""What every job shares around its pipeline: connecting to Ray, quiet logs, one-line errors, clean interrupts.

Under `ray job submit` (or with RAY_ADDRESS / --address) the job joins that cluster. Otherwise it starts a
private local Ray with no dashboard, which is what `make run` and a laptop want.

`run_job` runs a job's driver-side checks (before Ray starts), then the job, and turns what can go wrong into
an exit status and a few readable lines (tarflow.driver.run_driver, which the trainers share):

    0  done          1  shards failed, or an unexpected error (one line; traceback in a log file)
    2  bad usage: arguments, paths, checkpoints, settings (one line per problem, before any work)
    130 / 143        interrupted by SIGINT / SIGTERM (Ctrl-C, `ray job stop`): the summary of what finished
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys

# the one driver wrapper, shared with the trainers; re-exported here, where the jobs have always found it
from tarflow.driver import (  # noqa: F401
    FILE_ONLY,
    _stop_signal,
    job_log_path,
    open_job_log,
    without_control_codes,
    install_signal_handlers,
    interrupted_exit_code,
    is_usage_error,
    one_line,
    print_usage_error,
    root_cause,
    run_driver,
    started_private_ray,
    usage_errors,
    write_error_log,
)

from tarflow.pipelines import ray_private

log = logging.getLogger("tarflow")


def init_ray(address: str | None = None, num_cpus: int | None = None, progress_bars: bool | None = None) -> None:
    """Join the cluster at `address` / RAY_ADDRESS, or start a private local Ray.

    Progress bars (Ray Data's tqdm bars) only when stdout is a terminal: a log file or `ray job logs` would get
    their control codes. Ray Data logs progress lines instead; `progress_bars=False` turns both off.
    """
    import ray
    import ray.data

    quiet_progress_bars_unless_tty()
    open_job_log()
    route_ray_output_to_job_log()
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            with _sigterm_while_ray_starts():
                ray.init(address=address, log_to_driver=True)
        else:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            _token_auth_without_warning()
            start_local_ray(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
                            object_store_memory=_local_object_store_bytes())
            started_private_ray()  # the job's own: stopped before its interrupt line is read
    ray_private.pass_small_actor_arguments_by_value(_INLINE_ARG_BYTES)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress_bars is not False
    if not ctx.enable_progress_bars:
        ray_private.silence_progress_bars_off_warning()  # asked for (--no-progress): no warning that they are off
    if not _is_tty():
        # Ray Data logs progress lines instead of bars when stdout is not a terminal, except inside Ray workers
        # (Ray Train's data coordinator), where its default ray-tqdm bars would still write control codes
        ctx.use_ray_tqdm = False


def start_local_ray(attempts: int = 3, **init_kwargs) -> None:
    """`ray.init(address="local", ...)`, tried again when the new node does not register in time: Ray 2.60 gives
    its raylet a fixed 30 s to register with the GCS, which a loaded machine can miss (`The current node timed
    out during startup`); the half-started processes are shut down before the next try."""
    import ray

    for attempt in range(1, attempts + 1):
        try:
            with _sigterm_while_ray_starts():
                ray.init(address="local", **init_kwargs)
            return
        except Exception as e:  # noqa: BLE001 - only that startup timeout is retried
            if "timed out during startup" not in str(e) or attempt == attempts:
                raise
            log.warning("Ray's local node did not start in time (attempt %d of %d, the machine is busy); trying "
                        "again", attempt, attempts)
            ray.shutdown()


@contextlib.contextmanager
def _sigterm_while_ray_starts():
    """ray.init installs its own SIGTERM handler, `sys.exit(15)`, until the job's are installed again: a `ray job
    stop` while Ray starts is an interrupt like any other (exit 143 and the interrupt's line), not exit 15."""
    try:
        yield
    except SystemExit as e:
        if e.code != signal.SIGTERM:
            raise
        _stop_signal["signum"] = signal.SIGTERM
        raise KeyboardInterrupt("SIGTERM") from None


def _token_auth_without_warning() -> None:
    """Ray 2.60 turns token authentication on for a new local cluster when RAY_AUTH_MODE is unset, and warns
    about it on every run. Asking for it explicitly keeps it on, the token in ~/.ray/auth_token created once, and
    the warning away. An explicit RAY_AUTH_MODE (token or disabled) is left as it is."""
    if os.environ.get("RAY_AUTH_MODE") is None:
        ray_private.enable_token_auth()


def _is_tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def quiet_progress_bars_unless_tty() -> None:
    """No tqdm bars (Hugging Face downloads and shard loading, Ray Data, Ray Train) when stdout is not a terminal.

    Environment variables, so that Ray workers started from this process inherit them too."""
    if _is_tty():
        return
    for k in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
        os.environ.setdefault(k, "1")
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    except Exception:  # transformers absent or changed: its bars are cosmetic
        pass


def _local_object_store_bytes() -> int | None:
    """A small object store for a local run: Ray's default takes 30% of RAM, which a laptop needs."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None
    return int(min(2 << 30, max(256 << 20, total // 10)))


_INLINE_ARG_BYTES = 64 << 10  # an actor-pool worker's transform and DataContext up to this size go by value


def setup_logging(verbose: bool = False) -> None:
    """INFO lines from tarflow (a line per finished shard, progress) on stderr, with the time."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("tarflow").setLevel(logging.DEBUG if verbose else logging.INFO)
    quiet_progress_bars_unless_tty()


# ----------------------------------------------------------------------------------------------------------
# The job's log file: what Ray prints on its own goes there (the file itself: tarflow.driver)

class _ToJobLog(logging.Handler):
    """Hands a record to the job's log file alone (Ray rewrites the formatters of its logger's handlers)."""

    def emit(self, record: logging.LogRecord) -> None:
        record.msg = without_control_codes(record.getMessage())
        record.args = None
        FILE_ONLY.handle(record)


def route_ray_output_to_job_log() -> None:
    """Keep what Ray prints by itself on the driver off the job's output, in the job's log file instead.

    Ray prints, on the driver, from two background threads: the lines of its workers (with log_to_driver) and
    the errors that raylets and the GCS publish (even without log_to_driver: e.g. the colourised `(raylet) Task
    ... submit failed ... killed by ray.kill` when Ray Data ends its actors under load). Both go through one
    private function of Ray's, replaced here (ray_private.route_driver_prints); so are the console handlers of
    the `ray` and `ray.data` loggers (Ray Data's execution plans, warnings and, off a terminal, its progress
    lines; its bars on a terminal are not logging and stay). Without a job log file, nothing changes.
    """
    if not job_log_path():
        return

    def to_job_log(source: str, line: str) -> None:
        FILE_ONLY.info("(%s) %s", source, without_control_codes(line))

    ray_private.route_driver_prints(to_job_log)
    try:
        import ray.data  # noqa: F401  (configures its logger on import: its console handler is replaced here)
    except ImportError:
        pass
    for name in ("ray", "ray.data"):
        ray_logger = logging.getLogger(name)
        if any(isinstance(h, _ToJobLog) for h in ray_logger.handlers):
            continue
        for h in list(ray_logger.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                ray_logger.removeHandler(h)
        ray_logger.addHandler(_ToJobLog())


# Running a job


def absolute_output(output: str) -> str:
    """A local output as an absolute path (what the summary prints); URLs unchanged."""
    from tarflow.data import storage

    if not output or storage.is_remote(output):
        return output
    return os.path.abspath(os.path.expanduser(output.removeprefix("file://")))


def run_job(run, cfg, summary_json: str | None, user_errors: tuple = (), check=None, start=None,
            job: str | None = None) -> int:
    """Check, start Ray, run a sharded job, print its summary (and keep it as JSON); return the exit status.

    tarflow.driver.run_driver with a sharded job's summary (JobSummary) and usage errors (OutputConflict too):
    `check()` runs on the driver before Ray starts or a model loads, `start()` connects to Ray; errors are one
    line each; an interrupt prints the summary of what finished.
    """
    from tarflow.pipelines.sharded import OutputConflict

    job = job or str(getattr(run, "__name__", "tarflow")).removeprefix("run_")
    return run_driver(run, cfg, summary_json, report=report_job_summary, job=job,
                      user_errors=(OutputConflict, *user_errors), check=check, start=start,
                      interrupted_early=lambda: "before any shard was written; nothing is lost: rerun the same "
                                                "command to start again")


def report_job_summary(summary) -> int:
    """Print a sharded job's summary; its exit status: 130/143 when interrupted, 1 when shards failed, else 0."""
    print(summary.render())
    if summary.output:
        print(f"  output: {absolute_output(summary.output)}")
    if summary.interrupted:
        left = max(summary.shards_total - summary.shards_done - summary.shards_skipped, 0)
        print(f"  interrupted ({signal.Signals(interrupted_exit_code() - 128).name}): {left} shards not finished; "
              "rerun the same command to resume (finished shards are skipped)")
        return interrupted_exit_code()
    return 1 if summary.shards_failed else 0


def add_actor_pool_args(p, what: str, batch_help: str):
    """The resource flags of a job whose model runs in an autoscaling actor pool (caption, generate)."""
    r = p.add_argument_group("resources")
    r.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a private local Ray)")
    r.add_argument("--num-workers", type=int, default=None,
                   help=f"most {what} of the autoscaling pool (default: every GPU the cluster has or its "
                        "autoscaler declares, 1 without GPUs)")
    r.add_argument("--min-workers", type=int, default=1, help="the pool never shrinks below this [%(default)s]")
    r.add_argument("--max-writers", type=int, default=8,
                   help="shards assembled and written at once, by tasks on the workers [%(default)s]")
    r.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPUs per actor (default: 1 when the cluster has or can add GPUs, else 0); set it on an "
                        "autoscaling cluster that starts with no GPU node")
    r.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs each actor reserves [%(default)s]")
    r.add_argument("--batch-size", type=int, default=None, help=batch_help)
    r.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    r.add_argument("--compile", action="store_true", help="torch.compile the decode step (GPU)")
    add_stall_timeout_arg(r)
    return r


def add_stall_timeout_arg(group) -> None:
    """--stall-timeout, in every sharded job's CLI (see sharded.StallWatch)."""
    from tarflow.pipelines.sharded import DEFAULT_STALL_TIMEOUT_S

    group.add_argument("--stall-timeout", type=float, default=DEFAULT_STALL_TIMEOUT_S, metavar="SECONDS",
                       help="stop the job (exit 2, saying which flags to change) when no row has arrived for this "
                            "long and the cluster did not grow meanwhile: a pool that starves the other stages, or "
                            "a request no node can satisfy, would wait forever; 0: never [%(default)g]")
