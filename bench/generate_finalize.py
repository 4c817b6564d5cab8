"""The generate job's finalize task memory against the shard's size (issue 22, item 3): the shard's tar is
streamed part by part (webdataset's TarWriter), so finalizing a shard of N parts must hold one part's images,
not N parts'.

    python -m bench.generate_finalize [--parts 4,32] [--rows-per-part 16] [--image-kb 256] [--tarflow PATH]

For each N: a process writes N parts of `--rows-per-part` generated rows (incompressible `--image-kb` images,
one failed row per part) as the job's PartWriter does; a fresh process then runs `finalize_shard` on them with
the job's GeneratedShardWriter (after a tiny shard, so that imports are not counted) and reports what
finalizing cost it: peak RSS above its RSS before the call (Linux VmHWM, reset first), Python's tracemalloc
peak and pyarrow's memory pool peak. `--tarflow PATH` runs the
measured processes on another checkout of tarflow (PATH first on PYTHONPATH), e.g. one before this change.
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# run as a file (the measured processes are): bench/tokenize.py must not shadow the standard library's
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

ROOT = os.path.dirname(HERE)
MB = 1 << 20


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _config(out: str):
    from tarflow.pipelines.generate import GenerateConfig

    return GenerateConfig(prompts="bench.jsonl", output=out, mllm="bench/mllm", tatok="bench/ta_tok.pth",
                          ar_detok="bench/ar_dtok.pth", vq="bench/vq.pt")


def make_parts(out: str, n_parts: int, rows_per_part: int, image_kb: int) -> list[str]:
    """N parts of one shard, as the job's last stage writes them; one part in memory at a time."""
    import pyarrow as pa

    from tarflow.pipelines.sharded import PartWriter
    try:
        from tarflow.data.schema import GENERATE_ENCODED_ROWS as rows_schema
    except ImportError:  # a tarflow from before the row schemas moved to tarflow.data.schema
        from tarflow.pipelines.generate import ENCODED_SCHEMA as rows_schema

    writer, paths = PartWriter(os.path.join(out, "_parts", "bench")), []
    for k in range(n_parts):
        rows = []
        for i in range(k * rows_per_part, (k + 1) * rows_per_part):
            ok = i % rows_per_part != rows_per_part - 1
            rows.append({"shard": "00000", "idx": i, "key": f"00000{i:04d}", "kind": "sample", "id": f"p{i}",
                         "index": 0, "prompt": f"A photo of object {i}.", "scale": 1, "seed": i, "ok": ok,
                         "codes": list(range(729)) if ok else None, "codes_fix": "ok" if ok else None,
                         "width": 512 if ok else None, "height": 512 if ok else None,
                         "image": os.urandom(image_kb * 1024) if ok else None,
                         "error_stage": None if ok else "generate", "error_reason": None if ok else "bench_failure",
                         "error_detail": None if ok else "one failed row per part"})
        meta = writer(pa.Table.from_pylist(rows, schema=rows_schema))
        paths += [p for p in meta.column("path").to_pylist() if p]
    return paths


def finalize(out: str, paths: list[str], n_rows: int) -> dict:
    """finalize_shard on the parts, in this process: what it cost."""
    import gc
    import tracemalloc

    import pyarrow as pa

    import tarflow.pipelines.generate as generate
    from tarflow.pipelines.sharded import ShardJob, finalize_shard

    def job(folder: str) -> ShardJob:
        return ShardJob(job="generate", layout=generate.generate_layout(folder), facts={}, sources={},
                        writer=generate.GeneratedShardWriter(_config(folder)), run="bench")

    # a tiny shard first: the imports and caches of a first finalize are not what a shard's size costs
    warm = os.path.join(out, "warm-up")
    finalize_shard(job(warm), "00000", {}, make_parts(warm, 1, 2, 1), {"n_samples": 2})
    spec = job(out)
    gc.collect()
    pool_before = pa.default_memory_pool().max_memory()
    rss_before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (peak RSS) to the current RSS
    tracemalloc.start()
    t0 = time.time()
    done = finalize_shard(spec, "00000", {}, paths, {"n_samples": n_rows})
    seconds = time.time() - t0
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"rows": done["counts"]["samples_in"], "ok": done["counts"]["ok"],
            "tar_mb": round(os.path.getsize(os.path.join(out, "00000.tar")) / MB, 1),
            "peak_rss_above_start_mb": round((_status_kb("VmHWM") - rss_before) / 1024, 1),
            "tracemalloc_peak_mb": round(traced / MB, 1),
            "arrow_pool_peak_mb": round(max(pa.default_memory_pool().max_memory() - pool_before, 0) / MB, 1),
            "seconds": round(seconds, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="4,32", help="comma-separated shard sizes in parts")
    p.add_argument("--rows-per-part", type=int, default=16)
    p.add_argument("--image-kb", type=int, default=256)
    p.add_argument("--tarflow", default=ROOT, help="the tarflow checkout the measured processes import")
    p.add_argument("--child", nargs=3, metavar=("MODE", "OUT", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        mode, out, n = args.child
        if mode == "make":
            res = make_parts(out, int(n), args.rows_per_part, args.image_kb)
        else:
            res = finalize(out, json.loads(open(os.path.join(out, "parts.json")).read()), int(n))
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.abspath(args.tarflow)]
                                                        + [x for x in [os.environ.get("PYTHONPATH")] if x])}

    def child(mode: str, out: str, n: int):
        cmd = [sys.executable, os.path.abspath(__file__), "--rows-per-part", str(args.rows_per_part),
               "--image-kb", str(args.image_kb), "--child", mode, out, str(n)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            raise SystemExit(f"{mode} {n}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return json.loads(line[0][7:])

    part_mb = args.rows_per_part * args.image_kb / 1024
    print(f"tarflow from {os.path.abspath(args.tarflow)}; {args.rows_per_part} rows a part "
          f"({args.rows_per_part - 1} images of {args.image_kb} KB, one failed row): {part_mb:.1f} MB of images a part")
    print("| parts | rows | tar | peak RSS above start | tracemalloc peak | pyarrow pool peak | seconds |")
    print("|---|---|---|---|---|---|---|")
    for n in (int(x) for x in args.parts.split(",")):
        with tempfile.TemporaryDirectory(prefix="bench-finalize-") as out:
            paths = child("make", out, n)
            with open(os.path.join(out, "parts.json"), "w") as f:
                json.dump(paths, f)
            r = child("finalize", out, n * args.rows_per_part)
        print(f"| {n} | {r['rows']} ({r['ok']} ok) | {r['tar_mb']} MB | {r['peak_rss_above_start_mb']} MB | "
              f"{r['tracemalloc_peak_mb']} MB | {r['arrow_pool_peak_mb']} MB | {r['seconds']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
