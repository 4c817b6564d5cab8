"""Every private Ray name tarflow uses, each behind one small function; written and tested for Ray 2.60.x.

Ray 2.60 has no public API for these (checked against its docs and source): the autoscaler's node-type limits and
whether an autoscaler runs at all; token authentication asked for without its warning; the driver's printer of
worker and raylet lines; the arguments Ray Data hands its actor-pool workers; Ray Data's "progress bars
disabled" warning. Each function below says why it needs what it touches.

A Ray that changes one of them fails loudly, never silently: `check_ray_internals()` (run by
tests/test_ray_private.py) lists every name that is gone or changed, each message naming the function here and
the installed Ray version. At run time a function whose answer plans the job (`autoscaler_max_resources`,
`autoscaler_running`) raises `RayInternalsChanged`; one that only keeps the output quiet logs that message once
as a warning and lets the job go on. pyproject.toml pins ray >=2.60,<2.61: raise that bound only after
tests/test_ray_private.py passes on the new Ray.
"""
from __future__ import annotations

import functools
import inspect
import logging
from typing import Callable

log = logging.getLogger("tarflow")

WRITTEN_FOR_RAY = "2.60"


class RayInternalsChanged(RuntimeError):
    """A private Ray name that tarflow relies on is gone or changed: this is not the Ray tarflow was written for."""


def _changed(function: str, what: str) -> RayInternalsChanged:
    import ray

    return RayInternalsChanged(
        f"tarflow.pipelines.ray_private.{function}: Ray {ray.__version__} {what} (written for Ray "
        f"{WRITTEN_FOR_RAY}.x): install ray>=2.60,<2.61 as pyproject.toml says, or update this function")


_warned: set[str] = set()


def _warn_once(error: RayInternalsChanged) -> None:
    if str(error) not in _warned:
        _warned.add(str(error))
        log.warning("%s; the job goes on, its output may be noisier", error)


# ----------------------------------------------------------------------------------------------------------
# The private names, one lookup each: `check_ray_internals` calls them all


def _token_auth_enabler() -> Callable[[], None]:
    try:
        from ray._private.authentication.authentication_token_setup import _enable_token_auth
    except ImportError:
        raise _changed("enable_token_auth", "has no ray._private.authentication.authentication_token_setup."
                                            "_enable_token_auth") from None
    return _enable_token_auth


_OPERATOR_REFS = {"_map_transformer_ref": "_map_transformer", "_data_context_ref": "data_context"}


def _map_operators():
    try:
        from ray.data._internal.execution.operators.actor_pool_map_operator import ActorPoolMapOperator
        from ray.data._internal.execution.operators.map_operator import MapOperator
    except ImportError:
        raise _changed("pass_small_actor_arguments_by_value", "has no ray.data._internal.execution.operators."
                                                              "(actor_pool_)map_operator") from None
    for ref_name in _OPERATOR_REFS:
        if not isinstance(MapOperator.__dict__.get(ref_name), functools.cached_property):
            raise _changed("pass_small_actor_arguments_by_value",
                           f"has no cached_property MapOperator.{ref_name}")
    return ActorPoolMapOperator, MapOperator


def _driver_printer_module():
    try:
        import ray._private.worker as ray_worker
    except ImportError:
        raise _changed("route_driver_prints", "has no ray._private.worker") from None
    printer = getattr(ray_worker, "print_worker_logs", None)
    params = list(inspect.signature(printer).parameters) if callable(printer) else []
    if params[:3] != ["data", "print_file", "ignore_prefix"]:
        raise _changed("route_driver_prints", "has no ray._private.worker.print_worker_logs(data, print_file, "
                                              "ignore_prefix)")
    # replacing the module global reaches every line only while Ray's printer calls it by that global name
    stdstream = getattr(ray_worker, "print_to_stdstream", None)
    if "print_worker_logs" not in getattr(getattr(stdstream, "__code__", None), "co_names", ()):
        raise _changed("route_driver_prints", "no longer prints through ray._private.worker.print_worker_logs "
                                              "from print_to_stdstream")
    if not callable(getattr(ray_worker, "filter_autoscaler_events", None)):
        raise _changed("route_driver_prints", "has no ray._private.worker.filter_autoscaler_events")
    return ray_worker


_PROGRESS_OFF_KEY = "ray_data_progress_manager_disabled"


def _progress_off_warning_key() -> str:
    try:
        from ray.data._internal.progress import get_progress_manager
        source = inspect.getsource(get_progress_manager)
    except (ImportError, OSError, TypeError):
        source = ""
    if f'log_once("{_PROGRESS_OFF_KEY}")' not in source:
        raise _changed("silence_progress_bars_off_warning", "no longer warns under log_once(\"%s\") in ray.data."
                                                            "_internal.progress.get_progress_manager"
                       % _PROGRESS_OFF_KEY)
    return _PROGRESS_OFF_KEY


def _cluster_state():
    try:
        from ray._private.state import state
    except ImportError:
        raise _changed("autoscaler_max_resources", "has no ray._private.state.state") from None
    if not callable(getattr(state, "get_max_resources_from_cluster_config", None)):
        raise _changed("autoscaler_max_resources",
                       "has no ray._private.state.state.get_max_resources_from_cluster_config")
    return state


def _autoscaler_probes():
    try:
        from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
        from ray.autoscaler.v2.utils import is_autoscaler_v2
        from ray.experimental.internal_kv import _internal_kv_get
    except ImportError as e:
        raise _changed("autoscaler_running", f"lacks a name it needs ({e})") from None
    return _internal_kv_get, DEBUG_AUTOSCALING_STATUS, is_autoscaler_v2


_LOOKUPS = (_token_auth_enabler, _map_operators, _driver_printer_module, _progress_off_warning_key,
            _cluster_state, _autoscaler_probes)


def check_ray_internals() -> list[str]:
    """One line per private Ray name used here that the installed Ray lacks or changed; [] when all are there."""
    problems = []
    for lookup in _LOOKUPS:
        try:
            lookup()
        except RayInternalsChanged as e:
            problems.append(str(e))
    return problems


# ----------------------------------------------------------------------------------------------------------
# What the jobs call


def enable_token_auth() -> None:
    """Turn Ray's token authentication on for this process and its children, as Ray 2.60 does by itself for a new
    local cluster when RAY_AUTH_MODE is unset, but without the warning it prints then on every run: the variable
    alone is not enough, this process's cached Ray config must be read again too (Ray's `_enable_token_auth`)."""
    try:
        enable = _token_auth_enabler()
    except RayInternalsChanged as e:
        _warn_once(e)
        return
    enable()


def pass_small_actor_arguments_by_value(limit_bytes: int) -> None:
    """Ray Data's actor-pool workers get their transform and DataContext as arguments of at most `limit_bytes`
    by value, larger ones by object reference as before (tasks are unchanged); calling it again does nothing.

    Why: Ray 2.60's Ray Data puts both in the object store and hands the references to the MapWorker actors it
    creates with max_restarts=-1, and the core worker then logs an ERROR line (`core_worker.cc ... has
    constructor arguments in the object store and max_restarts > 0`, ray-project/ray#53727) for every actor.
    The operator holds both references for its whole life, so the line is noise; Ray inlines arguments this
    small, which removes its cause. No public option does it: max_restarts=0 would remove the actors' restart."""
    import ray

    try:
        actor_pool_op, map_op = _map_operators()
    except RayInternalsChanged as e:
        _warn_once(e)
        return
    if getattr(actor_pool_op, "_tarflow_small_args_by_value", False):
        return

    def by_value(ref_name: str, attr: str) -> functools.cached_property:
        by_ref = map_op.__dict__[ref_name].func

        def get(self):
            obj = getattr(self, attr)
            try:
                small = len(ray.cloudpickle.dumps(obj)) <= limit_bytes
            except Exception:  # noqa: BLE001 - an object that does not pickle here goes by reference, as before
                small = False
            return obj if small else by_ref(self)

        prop = functools.cached_property(get)
        prop.__set_name__(actor_pool_op, ref_name)
        return prop

    for ref_name, attr in _OPERATOR_REFS.items():
        setattr(actor_pool_op, ref_name, by_value(ref_name, attr))
    actor_pool_op._tarflow_small_args_by_value = True


def route_driver_prints(write: Callable[[str, str], None]) -> None:
    """Send what Ray prints by itself on the driver to `write(source, line)` instead of stdout/stderr: worker
    lines (log_to_driver) and the errors raylets and the GCS publish (printed even without log_to_driver). Ray's
    own tqdm bars are dropped, an autoscaler's lines filtered to its events as Ray does. `source` is Ray's
    prefix without parentheses ("raylet", "MapWorker(X) pid=42, ip=10.0.0.2"). Only the first call routes.

    Why: both reach the terminal from Ray's listener threads through `ray._private.worker.print_worker_logs`
    alone; Ray has no public hook for them (log_to_driver=False drops worker lines, not the raylet's errors)."""
    try:
        ray_worker = _driver_printer_module()
    except RayInternalsChanged as e:
        _warn_once(e)
        return
    if getattr(ray_worker, "_tarflow_routed", False):
        return
    try:
        from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC as tqdm_magic
    except ImportError:
        tqdm_magic = None

    def print_worker_logs(data, print_file=None, ignore_prefix=False):
        pid = data.get("pid")
        lines = data.get("lines", [])
        if pid == "autoscaler":
            lines = ray_worker.filter_autoscaler_events(lines)
        name = data.get("actor_name") or data.get("task_name") or ""
        source = f"{name} pid={pid}" if name else str(pid)
        if data.get("ip"):
            source += f", ip={data['ip']}"
        for line in lines:
            if tqdm_magic and tqdm_magic in line:
                continue
            write(source, line)

    ray_worker.print_worker_logs = print_worker_logs
    ray_worker._tarflow_routed = True


def silence_progress_bars_off_warning() -> None:
    """No "Progress bars disabled" warning from Ray Data when the job itself turned them off (--no-progress).

    Why: Ray Data warns once per process under a private log_once key; taking that key first is the only way
    short of filtering its logger by message text."""
    try:
        key = _progress_off_warning_key()
    except RayInternalsChanged as e:
        _warn_once(e)
        return
    from ray.util.debug import log_once

    log_once(key)


def autoscaler_max_resources() -> dict:
    """The most of each resource the cluster's autoscaler may bring up, from the node types of its cluster config
    ({} without an autoscaler, or one that publishes no config: the v1 autoscaler).

    Why: no public API gives it; Ray Data and Ray Train 2.60 read it through the same private call."""
    return dict(_cluster_state().get_max_resources_from_cluster_config() or {})


def autoscaler_running() -> bool:
    """Whether an autoscaler may watch this cluster: the v1 monitor writes its status to the GCS every few
    seconds, or the GCS (or this process's Ray config) says autoscaler v2. Ray 2.60 starts a v1 monitor on every
    head, read-only where the cluster has no autoscaling config, so this is True on a plain local Ray too.

    Why: no public API says it (`ray status` reads the same key)."""
    kv_get, status_key, is_v2 = _autoscaler_probes()
    return bool(kv_get(status_key)) or bool(is_v2())
