"""One GPU check of every GPU target (issue 12), side by side in one run, on the lent H200's image as it is:
its own Python and packages (torch, transformers, numpy, pillow, pyarrow; no Ray, no diffusers, no s3fs, no
network) plus this source tree.

    PYTHONUNBUFFERED=1 python bench/gpu_check.py 2>&1 | tee $OUT/log    # H200: real shapes, about 8.5 minutes
    python bench/gpu_check.py --tiny                                     # any machine: tiny shapes on CPU

Measurements (random weights throughout; figures are speeds, not quality):
  tatok_encode         TA-Tok at the real shape (SigLIP2 so400m/14-384, 1536 x 65536 codebook), bf16,
                       encode_scales at scales 1,2,3 on pre-decoded images: images/s eager and compiled, and the
                       encoder alone (target >= 450 images/s)
  tokenize_cpu_decode  the tokenize job's CPU stage without Ray: its ImageDecoder (decode_rgb + resize_uint8) on
                       512 px JPEGs in 16 processes: images/s, to compare with what the encoder takes
  ar_detok             AR de-tokenizer, llama-abs-LP, 256 px, CFG 4, batch 128: images/s eager and compiled
                       (target >= 20)
  mllm_decode          Tar-1.5B shape (Qwen2.5-1.5B config, vocab 217206): T2I tokens/s and images/s, captions/s,
                       tarflow's BatchedDecoder against HF generate at the same batch (targets >= 20,000 T2I
                       tokens/s, >= 50 captions/s)
  mllm_train_step      Tar-1.5B training steps, packed rows of 2048, bf16 autocast, AdamW: tokens/s and MFU
                       against the bf16 matmul rate measured in the same process (target MFU >= 40%)
  tatok_train_step     TA-Tok training steps at the real shape (issue 14: so400m teacher and student, K 65,536,
                       D 1,536, batch 32, bf16 autocast): images/s and MFU (no target set). The diffusion
                       de-tokenizer's step (bench/gpu_train.py --diffusion) needs diffusers, which the image lacks

Each measurement runs in its own process with a time budget: an error (a CUDA one too) is recorded with its
traceback tail in that measurement's JSON and the next one runs; the process's exit frees the GPU. Results:
$OUT/<measurement>.json (one per measurement, written as figures come in, so a measurement stopped at its
budget keeps what it had) and $OUT/gpu_check.json (all of them); $OUT defaults to bench/out/. One summary line
per measurement, and a table at the end.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time

_T0 = time.monotonic()  # this process's start: a measurement's budget counts from here, imports included

# bench/tokenize.py shadows the standard library's `tokenize`: take this folder off the path and put the
# repository root on it (the check runs from a plain source tree, tarflow not installed).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

from bench.common import Budget, Results, compiler, device_name, error_tail, free_device_memory  # noqa: E402


def _dtype(device):
    import torch

    return torch.bfloat16 if device == "cuda" else torch.float32


# -- the measurements: each fills its Results, within its Budget ---------------------------------------------


def tatok_encode(res: Results, device: str, tiny: bool, budget: Budget) -> None:
    from bench.gpu_tokenize import build_tatok, model_only

    model, _ = build_tatok(tiny)
    model.drop_unused()  # as TATok.from_checkpoint does: the layers after select_layer_id are never computed
    model = model.to(device, _dtype(device))
    batch, secs, scales = (16, 1.0, [1, 2, 3]) if tiny else (256, 10.0, [1, 2, 3])
    res.set(shape={"encoder": "SigLIP2 so400m/14-384" if not tiny else "tiny", "input_size": model.input_size,
                   "tokens_scale1": model.num_tokens(1), "codebook": model.codebook_size,
                   "bottleneck_dim": model.args.bottleneck_dim},
            batch=batch, scales=scales, dtype=str(_dtype(device)),
            method="encode_scales on uint8 images already on the device (/255 included), codes copied off")
    for name, make_encode, need, for_s in (
            ("eager", lambda: None, 0, secs),
            ("eager_encoder_only", lambda: lambda px, sc: model.encode_features(px), 0, secs / 2),
            ("compiled", lambda: compiler(device)(model.encode_scales, dynamic=False), 0 if tiny else 60, secs)):
        r = res.attempt(name, lambda: model_only(model, batch, scales, max_images=10**9, seconds=for_s,
                                                 encode=make_encode()), budget=budget, need_s=need)
        if r is not None:
            res.figure(**{f"{name}_images_per_s": r})
            print(f"TA-Tok {name}: {r:.1f} images/s (batch {batch})", flush=True)


def tokenize_cpu_decode(res: Results, device: str, tiny: bool, budget: Budget) -> None:
    from bench.common import photo_like_jpegs
    from bench.gpu_tokenize import decode_throughput

    processes = 2 if tiny else 16
    jpegs = photo_like_jpegs(64 if tiny else 256, 512)
    res.set(jpeg_size=512, unique_jpegs=len(jpegs), mean_jpeg_bytes=sum(map(len, jpegs)) / len(jpegs),
            cpus=os.cpu_count(), method="tarflow.pipelines.image_stages.ImageDecoder per decode batch in worker "
                                        "processes (multiprocessing, no Ray); pixels stay in the workers")
    r = res.attempt("decode", lambda: decode_throughput(jpegs, 384, processes, 2.0 if tiny else 10.0),
                    budget=budget)
    if r is not None:
        res.figure(images_per_s=r["images_per_s"], images_per_s_per_process=r["images_per_s_per_process"])
        res.set(processes=r["processes"], input_size=r["input_size"], images=r["images"])
        print(f"tokenize CPU stage: {r['images_per_s']:.1f} images/s in {processes} processes "
              f"({r['images_per_s_per_process']:.1f} per process)", flush=True)


def ar_detok(res: Results, device: str, tiny: bool, budget: Budget) -> None:
    from bench.gpu_detok import build, detok_throughput

    model = build(tiny, device, _dtype(device))
    res.set(shape="tiny" if tiny else "llama-abs-LP (30 layers, 20 heads, dim 1280), 256 px",
            dtype=str(_dtype(device)))
    detok_throughput(model, 8 if tiny else 128, res, compile=True, repeats=1 if tiny else 2, budget=budget,
                     compile_need_s=0 if tiny else 60)


def mllm_decode(res: Results, device: str, tiny: bool, budget: Budget) -> None:
    from bench.gpu_mllm import build, mllm_throughput

    model = build(tiny, device, _dtype(device))
    res.set(shape="tiny Qwen2, vocab 217206" if tiny else "Qwen2.5-1.5B config, vocab 217206",
            dtype=str(_dtype(device)), params=sum(p.numel() for p in model.parameters()))
    mllm_throughput(model, 4 if tiny else 256, res, n_t2i=16 if tiny else 729, n_cap=16 if tiny else 256,
                    n_base=8 if tiny else 64, caption_image_tokens=81 if tiny else 729, compile=True,
                    hf_static=True, budget=budget,
                    compile_need_s=0 if tiny else 80, hf_static_need_s=0 if tiny else 60)


def mllm_train_step(res: Results, device: str, tiny: bool, budget: Budget) -> None:
    import torch

    from bench.gpu_mllm import build
    from bench.gpu_train import matmul_peak, samples, train_throughput
    from tarflow.train.mllm import _take_rows

    peak, peak_dtype = matmul_peak(device, 256 if tiny else 8192)
    res.figure(matmul_peak_tflops=peak / 1e12)
    res.set(matmul_dtype=peak_dtype)
    print(f"{peak_dtype} matmul: {peak / 1e12:.3g} TFLOP/s", flush=True)
    model = build(tiny, device, torch.float32)  # fp32 weights under bf16 autocast, as tarflow's trainer
    max_length, steps = (512, 1) if tiny else (2048, 5)
    res.set(shape="tiny Qwen2, vocab 217206" if tiny else "Qwen2.5-1.5B config, vocab 217206",
            max_length=max_length, method="tarflow.train.mllm.packed_loss, fp32 weights, bf16 autocast, "
            "AdamW (make_optimizer), grad clipping; MFU = (6 N tokens + causal attention) / s / matmul peak")
    pool = samples(2000, image_tokens=(169, 81) if tiny else (729, 729, 169, 81))

    def packed():
        for rows in ((1,) if tiny else (8, 4, 2)):  # fewer rows when a step does not fit in memory
            try:
                res.set(rows=rows)
                return train_throughput(model, lambda p: _take_rows(p, rows, max_length, 0), pool, steps, res,
                                        "packed", peak, budget)
            except torch.cuda.OutOfMemoryError:
                res.set(**{f"out_of_memory_at_{rows}_rows": error_tail(600)})
            model.zero_grad(set_to_none=True)
            free_device_memory()
        raise RuntimeError("no row count fitted in memory")

    res.attempt("packed", packed, budget=budget)


def tatok_train_step(res: Results, device: str, tiny: bool, budget: Budget) -> None:
    from bench.gpu_train import matmul_peak, tatok_train_throughput

    peak, peak_dtype = matmul_peak(device, 256 if tiny else 8192)
    res.figure(matmul_peak_tflops=peak / 1e12)
    res.set(matmul_dtype=peak_dtype)
    res.attempt("train", lambda: tatok_train_throughput(tiny, device, 1 if tiny else 5, res, peak, budget=budget),
                budget=budget)


# name: (function, budget in seconds on GPU, budget with --tiny, figure -> target), in the order they run: the
# quick ones first, so that the time they leave over goes to the ones that compile most. The GPU budgets add up
# to 500 s, inside the 8.5 minutes the check may take. On CPU (--tiny) a budget only stops a hang: the whole run
# takes about 2 minutes on 2 idle cores, but tests share those cores, and a measurement stopped by a busy
# machine would fail them.
MEASUREMENTS = {
    "tokenize_cpu_decode": (tokenize_cpu_decode, 30, 60, {}),
    "mllm_train_step": (mllm_train_step, 50, 90, {"packed_mfu": 0.40}),
    "tatok_encode": (tatok_encode, 110, 90, {"images_per_s (best of eager, compiled)": 450}),
    "ar_detok": (ar_detok, 90, 90, {"images_per_s (best of eager, compiled)": 20}),
    "mllm_decode": (mllm_decode, 180, 150, {"t2i_tokens_per_s (tarflow, best)": 20000,
                                             "captions_per_s (tarflow, best)": 50}),
    "tatok_train_step": (tatok_train_step, 40, 90, {}),
}


def target_figures(name: str, figures: dict) -> dict:
    """The figure each target is checked against (the best variant where there are several)."""
    def best(suffix, prefix=""):
        vals = [v for k, v in figures.items() if k.endswith(suffix) and k.startswith(prefix)
                and "encoder_only" not in k]
        return max(vals) if vals else None

    return {"tatok_encode": lambda: [best("_images_per_s")],
            "tokenize_cpu_decode": lambda: [],
            "ar_detok": lambda: [best("_images_per_s")],
            "mllm_decode": lambda: [best("_t2i_tokens_per_s", "tarflow"), best("_captions_per_s", "tarflow")],
            "mllm_train_step": lambda: [figures.get("packed_mfu")],
            "tatok_train_step": lambda: []}[name]()


def versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("torch", "transformers", "huggingface_hub", "numpy", "PIL", "pyarrow"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # a missing package is itself a finding
            out[mod] = f"unavailable: {type(e).__name__}"
    try:
        import torch

        out["cuda"] = torch.version.cuda
    except Exception:
        pass
    return out


# -- one measurement, in its own process -----------------------------------------------------------------------


def run_one(name: str, out: str, tiny: bool, budget_s: float) -> None:
    import torch

    device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    res = Results(name, os.path.join(out, f"{name}.json"), device=device_name(device), tiny=tiny,
                  date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), budget_s=budget_s,
                  command="python bench/gpu_check.py" + (" --tiny" if tiny else ""),
                  versions=versions())
    margin = 3 if tiny else 10  # to finish writing before the parent stops this process
    budget = Budget(budget_s - margin - (time.monotonic() - _T0))
    res.attempt("measurement", lambda: MEASUREMENTS[name][0](res, device, tiny, budget))
    res.set(seconds=time.monotonic() - _T0)


# -- the driver ---------------------------------------------------------------------------------------------------


def run_child(name: str, out: str, tiny: bool, timeout: float) -> tuple[int | None, str]:
    """Run one measurement in a child process (its output streamed here); stop it, its process group too, at
    `timeout`. Returns (exit code or None when stopped, the output's tail)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--only", name, "--out", out, "--budget", f"{timeout:.0f}"]
    proc = subprocess.Popen(cmd + (["--tiny"] if tiny else []), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)
    tail: collections.deque = collections.deque(maxlen=40)

    def pump():
        for line in proc.stdout:
            sys.stdout.write(f"  [{name}] {line}")
            sys.stdout.flush()
            tail.append(line)

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the child and its decode workers
        proc.wait()
        rc = None
    t.join(timeout=5)
    return rc, "".join(tail)[-1500:]


def summary_line(name: str, data: dict, tiny: bool) -> str:
    figs = ", ".join(f"{k} {v:.4g}" for k, v in data.get("figures", {}).items())
    problems = [f"{k} failed" for k in data.get("errors", {})] + [f"{k} skipped" for k in data.get("skipped", {})]
    targets = MEASUREMENTS[name][3]
    checks = []
    for (what, goal), value in zip(targets.items(), target_figures(name, data.get("figures", {}))):
        verdict = "n/a on CPU" if tiny else ("no figure" if value is None else ("met" if value >= goal else "MISSED"))
        checks.append(f"{what} >= {goal}: {verdict}")
    state = "ok" if data.get("ok") else "INCOMPLETE"
    return (f"== {name}: {state} in {data.get('seconds', 0):.0f} s | {figs or 'no figures'}"
            + (f" | {'; '.join(problems)}" if problems else "") + (f" | {'; '.join(checks)}" if checks else ""))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU, the same code paths (tests)")
    p.add_argument("--out", default=None, help="folder for the JSON files (default $OUT, else bench/out/)")
    p.add_argument("--total-seconds", type=float, default=None, help="time for the whole check (510 / 570 tiny)")
    p.add_argument("--skip", default="", help="comma-separated measurements to leave out")
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)  # the driver's child processes
    p.add_argument("--budget", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    out = args.out or os.environ.get("OUT") or os.path.join(_HERE, "out")
    os.makedirs(out, exist_ok=True)
    if args.only:
        run_one(args.only, out, args.tiny, args.budget)
        return 0

    t_start = time.monotonic()
    total = args.total_seconds or (570 if args.tiny else 510)
    names = [n for n in MEASUREMENTS if n not in args.skip.split(",")]
    print(f"gpu_check: {', '.join(names)}; {total:.0f} s in all; results in {out}", flush=True)
    results, lines, carry = {}, [], 0.0
    for i, name in enumerate(names):
        planned = MEASUREMENTS[name][2 if args.tiny else 1]
        left = total - (time.monotonic() - t_start)
        timeout = min(planned + carry, left)
        path = os.path.join(out, f"{name}.json")
        if os.path.exists(path):
            os.remove(path)
        t0 = time.monotonic()
        if timeout < 5:
            rc, tail = None, "not started: the check's total time was used up"
        else:
            print(f"-- {name} (budget {timeout:.0f} s)", flush=True)
            rc, tail = run_child(name, out, args.tiny, timeout)
        spent = time.monotonic() - t0
        carry = max(0.0, planned + carry - spent)  # time a measurement did not use goes to the next ones
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            data = {"name": name, "tiny": args.tiny, "figures": {}, "errors": {}, "skipped": {}}
        if rc != 0:
            why = "stopped at its time budget" if rc is None else f"its process exited with code {rc}"
            data.setdefault("errors", {})["process"] = f"{why} after {spent:.0f} s; output tail:\n{tail}"
        data.setdefault("seconds", spent)
        data["ok"] = bool(data.get("figures")) and not data.get("errors") and not data.get("skipped")
        with open(path, "w") as f:
            json.dump(data, f, indent=2)
        results[name] = data
        lines.append(summary_line(name, data, args.tiny))
        print(lines[-1], flush=True)

    for f in os.listdir(out):  # a results file a stopped child was writing: only its last full copy counts
        if f.endswith(".json.tmp"):
            os.remove(os.path.join(out, f))
    summary = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "tiny": args.tiny,
               "seconds": time.monotonic() - t_start, "versions": versions(), "measurements": results}
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\ngpu_check finished in {summary['seconds']:.0f} s ({sum(d['ok'] for d in results.values())} of "
          f"{len(results)} measurements complete); JSON in {out}")
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
