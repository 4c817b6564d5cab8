"""tarflow's floors: every import of every module (inside functions too) points down.

    jobs/       argument parsing                                  6
    train/      Ray Train loops                                   5
    pipelines/  Ray Data stages and the sharded-job core          4
    runtime     tarflow/driver.py: checks, one-line errors, exits 3
    models/     the Tar model family in plain PyTorch, no Ray     2
    data/       formats and storage, no Ray                       1
    base        tarflow/__init__.py, tarflow/preflight.py         0

And two rules across floors: a pipelines job module (tokenize, caption, generate: what a job of jobs/ runs) is
imported by no module of tarflow, so what two jobs or a trainer share lives below it; train/ takes from pipelines/
only the shared runtime (pipelines/runtime.py: Ray start-up, logs) and the image reading stages
(pipelines/image_stages.py, what the TA-Tok trainer streams).
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "tarflow"

FLOORS = ("base", "data", "models", "runtime", "pipelines", "train", "jobs")  # lowest first
# tarflow/*.py: a new top-level module gets its floor here (the test says so when it has none)
TOP_LEVEL = {"__init__": "base", "preflight": "base", "driver": "runtime"}
NO_RAY = ("base", "data", "models")
# every module of tarflow/pipelines is one or the other (the test says so when it is neither)
JOB_MODULES = {"tarflow.pipelines.tokenize", "tarflow.pipelines.caption", "tarflow.pipelines.generate"}
SHARED_PIPELINES = {"tarflow.pipelines.sharded", "tarflow.pipelines.checks", "tarflow.pipelines.runtime",
                    "tarflow.pipelines.image_stages", "tarflow.pipelines.ray_private"}
# what train/ may take from pipelines/: Ray start-up and logs, and the image reading stages the TA-Tok trainer streams
TRAIN_MAY_USE = {"tarflow.pipelines.runtime", "tarflow.pipelines.image_stages"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    base = REPO.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def floor_of(name: str) -> str | None:
    """The floor of a module of tarflow or jobs/ (None: not ours); raises for a top-level module with none."""
    parts = name.split(".")
    if parts[0] == "jobs":
        return "jobs"
    if parts[0] != "tarflow":
        return None
    if len(parts) == 1:
        return "base"
    if parts[1] in ("data", "models", "pipelines", "train"):
        return parts[1]
    if parts[1] in TOP_LEVEL:
        return TOP_LEVEL[parts[1]]
    raise AssertionError(f"tarflow/{parts[1]}.py has no floor: give it one in TOP_LEVEL of tests/test_layers.py")


def imports(tree: ast.AST, importer: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, module) for every import in `tree`, top-level or inside a function; `from a import b` names a.b
    when that is a module."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = importer.split(".") if is_package else importer.split(".")[:-1]
                package = package[:len(package) - node.level + 1]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module
            out += [(node.lineno, f"{base}.{a.name}" if is_module(f"{base}.{a.name}") else base) for a in node.names]
    return list(dict.fromkeys(out))  # `from a import b, c`: once


def problems_of(source: str, path: str, name: str, is_package: bool = False) -> list[str]:
    """Every import of one module that breaks the floors, as `file:line imports X (why)`."""
    own = floor_of(name)
    found = []
    for line, target in imports(ast.parse(source, path), name, is_package):
        where = f"{path}:{line} imports {target}"
        if target.split(".")[0] == "ray":
            if own in NO_RAY:
                found.append(f"{where} (Ray, and {own}/ knows nothing of Ray)")
            continue
        floor = floor_of(target)
        if floor is None:
            continue
        if FLOORS.index(floor) > FLOORS.index(own):
            found.append(f"{where} (floor {floor} above floor {own})")
        elif target in JOB_MODULES and target != name:
            found.append(f"{where} (a job module: what it shares belongs on a floor below it)")
        elif own == "train" and floor == "pipelines" and target not in TRAIN_MAY_USE:
            found.append(f"{where} (train/ uses only these of pipelines/: {sorted(TRAIN_MAY_USE)})")
    return found


def package_modules() -> list[Path]:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 40, f"only {len(files)} modules found under {PACKAGE}"
    return files


def test_every_import_points_down_the_floors():
    found = []
    for path in package_modules():
        found += problems_of(path.read_text(), str(path.relative_to(REPO)), module_name(path),
                             path.name == "__init__.py")
    assert not found, "imports that break tarflow's floors:\n" + "\n".join(found)


def test_every_pipelines_module_is_a_job_or_shared():
    names = {module_name(p) for p in (PACKAGE / "pipelines").glob("*.py") if p.name != "__init__.py"}
    names |= {f"tarflow.pipelines.{d.name}" for d in (PACKAGE / "pipelines").iterdir() if (d / "__init__.py").is_file()}
    assert names == JOB_MODULES | SHARED_PIPELINES, (
        f"unclassified: {sorted(names - JOB_MODULES - SHARED_PIPELINES)}, gone: "
        f"{sorted((JOB_MODULES | SHARED_PIPELINES) - names)}: update JOB_MODULES / SHARED_PIPELINES")


def test_models_and_data_import_no_ray_even_inside_functions():
    seen = 0
    for path in package_modules():
        if floor_of(module_name(path)) in NO_RAY:
            seen += 1
            ray = [(line, t) for line, t in imports(ast.parse(path.read_text()), module_name(path),
                                                    path.name == "__init__.py") if t.split(".")[0] == "ray"]
            assert not ray, f"{path.relative_to(REPO)}:{ray[0][0]} imports {ray[0][1]}"
    assert seen >= 20


def test_the_check_names_each_kind_of_wrong_import():
    """The walker itself: an upward import inside a function, Ray in models/, a job module, pipelines in train/."""
    upward = problems_of("def f():\n    from tarflow.pipelines.sharded import ShardLayout\n",
                         "tarflow/data/x.py", "tarflow.data.x")
    assert upward == ["tarflow/data/x.py:2 imports tarflow.pipelines.sharded (floor pipelines above floor data)"]
    assert problems_of("from tarflow.models.demo import ensure_random_tatok\n", "tarflow/data/x.py",
                       "tarflow.data.x") == ["tarflow/data/x.py:1 imports tarflow.models.demo "
                                             "(floor models above floor data)"]
    assert problems_of("import ray.data\n", "tarflow/models/x.py", "tarflow.models.x") == [
        "tarflow/models/x.py:1 imports ray.data (Ray, and models/ knows nothing of Ray)"]
    assert "a job module" in problems_of("from tarflow.pipelines import caption\n", "tarflow/pipelines/checks.py",
                                         "tarflow.pipelines.checks")[0]
    assert "train/ uses only" in problems_of("from tarflow.pipelines.sharded import plan_pool\n",
                                             "tarflow/train/x.py", "tarflow.train.x")[0]
    assert problems_of("from . import storage\nfrom ..models import tatok\n", "tarflow/data/x.py",
                       "tarflow.data.x") == ["tarflow/data/x.py:2 imports tarflow.models.tatok "
                                             "(floor models above floor data)"]
    assert problems_of("from tarflow.pipelines.runtime import init_ray\nimport ray.train\n",
                       "tarflow/train/x.py", "tarflow.train.x") == []
