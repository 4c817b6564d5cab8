"""The private Ray names tarflow uses (tarflow/pipelines/ray_private.py): all there in the installed Ray, and a Ray
that changed one fails loudly, naming the function and the Ray version, instead of going on silently."""
import logging
import types

import pytest

from tarflow.pipelines import ray_private


def test_every_private_ray_name_tarflow_uses_is_there_in_the_installed_ray():
    import ray

    problems = ray_private.check_ray_internals()
    assert not problems, (f"Ray {ray.__version__} lacks or changed private names that tarflow.pipelines.ray_private "
                          "uses; update those functions before raising pyproject.toml's ray bound:\n"
                          + "\n".join(problems))


def test_a_ray_without_them_fails_loudly_naming_the_function_and_the_ray_version(monkeypatch, caplog):
    import ray
    import ray._private.worker as ray_worker
    from ray._private.state import state
    from ray.data._internal.execution.operators.map_operator import MapOperator

    version = ray.__version__.replace(".", r"\.")
    # what plans the job raises
    monkeypatch.delattr(type(state), "get_max_resources_from_cluster_config")
    with pytest.raises(ray_private.RayInternalsChanged,
                       match=rf"^tarflow\.pipelines\.ray_private\.autoscaler_max_resources: Ray {version} has no "
                             r"ray\._private\.state\.state\.get_max_resources_from_cluster_config .*ray>=2\.60,<2\.61"):
        ray_private.autoscaler_max_resources()
    # what only keeps the output quiet warns once and leaves Ray as it is
    monkeypatch.setattr(ray_private, "_warned", set())
    monkeypatch.setattr(MapOperator, "_map_transformer_ref", property(lambda self: None))
    monkeypatch.setattr(ray_worker, "print_to_stdstream", lambda data, ignore_prefix: None)
    printer = ray_worker.print_worker_logs
    with caplog.at_level(logging.WARNING, logger="tarflow"):
        ray_private.pass_small_actor_arguments_by_value(1 << 10)
        ray_private.pass_small_actor_arguments_by_value(1 << 10)
        ray_private.route_driver_prints(lambda source, line: None)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith(f"tarflow.pipelines.ray_private.pass_small_actor_arguments_by_value: Ray "
                                  f"{ray.__version__} has no cached_property MapOperator._map_transformer_ref")
    assert "route_driver_prints" in warnings[1] and "print_to_stdstream" in warnings[1]
    assert ray_worker.print_worker_logs is printer
    problems = ray_private.check_ray_internals()
    assert len(problems) == 3 and all(ray.__version__ in p for p in problems), problems


def test_small_actor_arguments_go_by_value_large_ones_by_reference_and_a_local_ray_has_no_autoscaler_limits(
        ray_local):
    from ray.data._internal.execution.operators.actor_pool_map_operator import ActorPoolMapOperator

    ray_private.pass_small_actor_arguments_by_value(1 << 10)  # the limit of the first call stays
    transformer_ref = ActorPoolMapOperator.__dict__["_map_transformer_ref"]
    context_ref = ActorPoolMapOperator.__dict__["_data_context_ref"]
    small = types.SimpleNamespace(_map_transformer=[1, 2, 3], data_context={"a": 1})
    assert transformer_ref.func(small) == [1, 2, 3] and context_ref.func(small) == {"a": 1}
    large = types.SimpleNamespace(_map_transformer=b"x" * (1 << 20), _warn_large_udf=lambda ref: None)
    ref = transformer_ref.func(large)
    assert isinstance(ref, ray_local.ObjectRef) and ray_local.get(ref) == large._map_transformer

    assert ray_private.autoscaler_max_resources() == {}  # no autoscaling config on a local Ray
