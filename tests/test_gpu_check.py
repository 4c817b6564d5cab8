"""bench/gpu_check.py --tiny: the GPU check's code paths on CPU at tiny shapes, as the lent GPU's image runs it
(no Ray, no diffusers, no s3fs): every measurement writes its JSON with positive figures, so the check cannot
rot between the sessions that have a GPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BLOCKED = ("ray", "diffusers", "s3fs")  # not on the H200 image

# measurement -> figures it must report; a compiled variant may instead record its compile failure
EXPECTED = {
    "tatok_encode": ["eager_images_per_s", "eager_encoder_only_images_per_s", "compiled_images_per_s"],
    "tokenize_cpu_decode": ["images_per_s", "images_per_s_per_process"],
    "ar_detok": ["eager_images_per_s", "eager_tokens_per_s", "compiled_images_per_s", "compiled_tokens_per_s"],
    "mllm_decode": ["hf_dynamic_t2i_tokens_per_s", "hf_dynamic_captions_per_s", "tarflow_eager_t2i_tokens_per_s",
                    "tarflow_eager_t2i_images_per_s", "tarflow_eager_captions_per_s",
                    "tarflow_compiled_t2i_tokens_per_s", "tarflow_compiled_captions_per_s",
                    "hf_static_t2i_tokens_per_s"],
    "mllm_train_step": ["matmul_peak_tflops", "packed_tokens_per_s", "packed_mfu", "packed_step_seconds"],
    "tatok_train_step": ["matmul_peak_tflops", "tatok_images_per_s", "tatok_mfu", "tatok_step_seconds"],
}
COMPILED = {"compiled", "tarflow_compiled"}  # the variants allowed to fail


def blocker(folder: Path) -> Path:
    """A folder that, first on PYTHONPATH, makes `import ray` (diffusers, s3fs) raise ImportError in every
    process, the check's children and worker processes too."""
    for name in BLOCKED:
        (folder / name).mkdir(parents=True)
        (folder / name / "__init__.py").write_text(f"raise ImportError('{name} is not on the GPU image')\n")
    return folder


@pytest.mark.cluster  # the heavier group: every GPU measurement rehearsed on CPU takes minutes here
def test_gpu_check_tiny_runs_without_ray_diffusers_s3fs(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out),
               PYTHONPATH=os.pathsep.join([str(blocker(tmp_path / "block")), os.environ.get("PYTHONPATH", "")]))
    for name in BLOCKED:
        r = subprocess.run([sys.executable, "-c", f"import {name}"], env=env, capture_output=True, text=True)
        assert r.returncode != 0 and "not on the GPU image" in r.stderr, f"the {name} blocker does not block"

    r = subprocess.run([sys.executable, "bench/gpu_check.py", "--tiny"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    assert set(summary["measurements"]) == set(EXPECTED)
    for name, figures in EXPECTED.items():
        data = json.loads((out / f"{name}.json").read_text())
        assert data["name"] == name and data["tiny"] is True and data["device"] == "cpu"
        assert data["versions"]["torch"] and data["date"] and data["seconds"] > 0
        assert not data["skipped"], (name, data["skipped"])
        assert set(data["errors"]) <= COMPILED, (name, data["errors"])  # any other failure fails the test
        for key in figures:
            variant = next((v for v in COMPILED if key.startswith(v + "_")), None)
            if variant in data["errors"]:  # a compile failure, recorded with its traceback
                assert "Traceback" in data["errors"][variant]
                continue
            assert data["figures"][key] > 0, (name, key, data["figures"])
        assert f"== {name}: " in r.stdout  # its summary line


def test_results_keep_errors_and_skips_and_go_on(tmp_path):
    """What the check relies on to go on after a failure: the error's traceback recorded, the next variant run,
    a variant that no longer fits its budget skipped, the file current after each."""
    from bench.common import Budget, Results

    path = tmp_path / "m.json"
    res = Results("m", str(path), device="cpu")
    assert res.attempt("compiled", lambda: 1 / 0) is None
    assert res.attempt("eager", lambda: 3.0) == 3.0
    res.figure(eager_images_per_s=3.0)
    assert res.attempt("static", lambda: 3.0, budget=Budget(1.0), need_s=30.0) is None
    data = json.loads(path.read_text())
    assert "Traceback" in data["errors"]["compiled"] and "ZeroDivisionError" in data["errors"]["compiled"]
    assert set(data["errors"]) == {"compiled"} and set(data["skipped"]) == {"static"}
    assert data["figures"] == {"eager_images_per_s": 3.0} and data["device"] == "cpu"
