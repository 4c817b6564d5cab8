"""bench/gpu_check.py --tiny: the GPU check's code paths on CPU at tiny shapes, as the lent GPU's image runs it
(no Ray, no diffusers, no s3fs): every measurement writes its JSON with positive figures that agree with the
counts they were made from and with the machine's measured matmul peak (figure_problems), so the check cannot
rot between the sessions that have a GPU. figure_problems itself is tested on figures broken one at a time."""
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
    results = {name: json.loads((out / f"{name}.json").read_text()) for name in EXPECTED}
    problems = figure_problems(results)
    assert not problems, problems


# A rate's upper bound: a measured path does at least `params` FLOPs per generated token, and no CPU or GPU runs
# 20x faster than its own measured matmul peak; a path that times nothing (a generate that returns at once, a
# timer read in the wrong place) gives rates thousands of times higher.
PEAK_MARGIN = 20.0


def figure_problems(results: dict[str, dict]) -> list[str]:
    """What a broken measurement path would get wrong, from the figures and facts each measurement records: the
    rates must agree with the counts they were made from (tokens per image, images per step, useful tokens per
    packed row, the FLOPs counted per step), the MFUs must be fractions of the measured peak, and no rate may
    imply more FLOP/s than the machine's measured matmul peak allows. Independent of the machine's speed."""
    problems = []

    def close(a, b, what, rel=0.02):
        if not abs(a - b) <= rel * max(abs(a), abs(b), 1e-12):
            problems.append(f"{what}: {a:.6g} != {b:.6g}")

    train = results["mllm_train_step"]
    peak_tflops = train["figures"]["matmul_peak_tflops"]
    if not 1e-6 < peak_tflops < 1e4:
        problems.append(f"matmul_peak_tflops {peak_tflops} is no machine's")
    peak = peak_tflops * 1e12

    f = results["tokenize_cpu_decode"]["figures"]
    d = results["tokenize_cpu_decode"]
    close(f["images_per_s"], d["processes"] * f["images_per_s_per_process"], "decode images/s = processes x each")
    if d["images"] < d["processes"]:
        problems.append(f"decode: {d['images']} images in {d['processes']} processes")

    d = results["ar_detok"]
    for v in ("eager", "compiled"):
        if f"{v}_images_per_s" in d["figures"]:
            close(d["figures"][f"{v}_tokens_per_s"] / d["figures"][f"{v}_images_per_s"], d["tokens_per_image"],
                  f"ar_detok {v}: tokens/s over images/s = tokens per image")

    d = results["mllm_decode"]
    for key, rate in d["figures"].items():
        if key.endswith("_t2i_tokens_per_s") and rate * d["params"] > PEAK_MARGIN * peak:
            problems.append(f"mllm_decode {key} {rate:.6g} x {d['params']} params exceeds {PEAK_MARGIN}x the peak")
    for tag in ("tarflow_eager", "tarflow_compiled"):
        fig = d["figures"]
        if f"{tag}_t2i_images_per_s" in fig:
            close(fig[f"{tag}_t2i_tokens_per_s"] / fig[f"{tag}_t2i_images_per_s"], d["t2i_tokens_per_image"],
                  f"mllm_decode {tag}: T2I tokens/s over images/s = tokens per image")
        if f"{tag}_captions_per_s" in fig:
            per = fig[f"{tag}_caption_tokens_per_s"] / fig[f"{tag}_captions_per_s"]
            if not 0 < per <= d["caption_tokens"] + 1:
                problems.append(f"mllm_decode {tag}: {per:.4g} tokens per caption, not in (0, {d['caption_tokens'] + 1}]")

    fig = train["figures"]
    if "packed_mfu" in fig:
        if not 0 < fig["packed_mfu"] < 3:
            problems.append(f"packed_mfu {fig['packed_mfu']:.4g} is not a fraction of the measured peak")
        per_step = fig["packed_tokens_per_s"] * fig["packed_step_seconds"]
        rows, length = train["rows_shape"]
        if not 0 < per_step <= rows * length * (1 + 1e-6):
            problems.append(f"packed: {per_step:.6g} useful tokens a step in {rows} rows of {length}")
        if train.get("packed_steps") == 1:
            close(per_step, rows * length * (1 - fig["packed_padding_fraction"]), "packed: useful tokens a step")

    d = results["tatok_train_step"]
    fig = d["figures"]
    flops = {int(k): v for k, v in d["tatok_flops_per_step"].items()}
    if not flops[1] > flops[2] > flops[3] > 0:  # fewer tokens after the pool at each larger scale
        problems.append(f"tatok FLOPs per step by pool scale {flops} do not fall with the scale")
    close(fig["tatok_images_per_s"] * fig["tatok_step_seconds"], d["tatok_batch"], "tatok: images a step")
    counted = sum(flops[1 + i % 3] for i in range(d["tatok_steps"]))  # the steps timed cycle the scales 1, 2, 3
    # against the peak this measurement took itself (each measures its own; two on a loaded CPU differ)
    tatok_peak = fig.get("matmul_peak_tflops", peak_tflops) * 1e12
    close(fig["tatok_mfu"], counted / (fig["tatok_step_seconds"] * d["tatok_steps"]) / tatok_peak, "tatok MFU")
    if not 0 < fig["tatok_mfu"] < 3:
        problems.append(f"tatok_mfu {fig['tatok_mfu']:.4g} is not a fraction of the measured peak")
    return problems


def _good_results() -> dict:
    """Figures as a correct tiny run on CPU records them (shapes of bench/gpu_check.py --tiny)."""
    peak = 0.015  # TFLOP/s
    return {
        "mllm_train_step": {"figures": {"matmul_peak_tflops": peak, "packed_tokens_per_s": 400.0,
                                        "packed_step_seconds": 1.0, "packed_padding_fraction": 0.21875,
                                        "packed_mfu": 0.2},
                            "rows_shape": [1, 512], "packed_steps": 1},
        "tokenize_cpu_decode": {"figures": {"images_per_s": 60.0, "images_per_s_per_process": 30.0},
                                "processes": 2, "images": 128},
        "ar_detok": {"figures": {"eager_images_per_s": 4.0, "eager_tokens_per_s": 64.0}, "tokens_per_image": 16},
        "mllm_decode": {"figures": {"tarflow_eager_t2i_tokens_per_s": 800.0, "tarflow_eager_t2i_images_per_s": 50.0,
                                    "tarflow_eager_captions_per_s": 20.0, "tarflow_eager_caption_tokens_per_s": 200.0,
                                    "hf_dynamic_t2i_tokens_per_s": 300.0},
                        "params": 7_000_000, "t2i_tokens_per_image": 16, "caption_tokens": 16},
        "tatok_train_step": {"figures": {"matmul_peak_tflops": peak, "tatok_images_per_s": 16.0,
                                         "tatok_step_seconds": 0.5, "tatok_mfu": 3.0e9 / 0.5 / (peak * 1e12)},
                             "tatok_flops_per_step": {"1": 3.0e9, "2": 2.0e9, "3": 1.8e9}, "tatok_batch": 8,
                             "tatok_steps": 1},
    }


@pytest.mark.parametrize("broken", [
    None,
    ("ar_detok", "eager_tokens_per_s", 4.0),  # images counted as tokens
    ("mllm_decode", "tarflow_eager_t2i_tokens_per_s", 1e5),  # a generate that returns at once
    ("mllm_decode", "hf_dynamic_t2i_tokens_per_s", 1e5),
    ("mllm_train_step", "packed_mfu", 12.0),  # FLOPs counted 60x
    ("mllm_train_step", "packed_tokens_per_s", 4000.0),  # padding counted, or a step timed short
    ("tatok_train_step", "tatok_mfu", 0.004),  # the FLOPs of another step
    ("tatok_train_step", "tatok_images_per_s", 160.0),  # a step timed 10x short
    ("tokenize_cpu_decode", "images_per_s", 30.0),  # one process counted
    ("mllm_train_step", "matmul_peak_tflops", float("inf")),  # a matmul timed at 0 s
], ids=lambda b: "correct" if b is None else f"{b[0]}.{b[1]}")
def test_the_figures_a_broken_path_makes_are_caught(broken):
    """figure_problems, the GPU check rehearsal's bounds, passes a consistent set of figures and names each
    figure that a broken path would make (one broken figure at a time)."""
    results = _good_results()
    if broken is None:
        assert figure_problems(results) == []
        return
    name, key, value = broken
    results[name]["figures"][key] = value
    problems = figure_problems(results)
    assert problems, (name, key, value)


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
