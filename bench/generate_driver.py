"""The generate job's driver memory against the prompt table's size (issue 21, item 6): its peak RSS for a table
of 10,000 rows and one of 1,000,000 must differ by less than 100 MB, since tasks read the table in row groups and
the driver holds only per-row-group counts and one descriptor per output shard.

    python -m bench.generate_driver [--rows 10000,1000000] [--format csv] [--samples-per-shard 10000]

Each size runs in its own process (peak RSS is per process): the whole job on a private local Ray, with a
generator that makes 1x1 images from the seed (no models: the driver's side of the job is what is measured;
the real stages' memory is on the workers). Also measured, in another process, what the first round's driver
did before the job started: the whole table read as Python dicts and expanded into requests.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def patient_ray_start(wait_s: float = 300) -> None:
    """On a machine shared by many jobs, Ray's local start gives up when its raylet has not registered within
    30 s (a fixed limit in ray._private.node); wait up to `wait_s` instead. For this benchmark only."""
    import ray._private.services as services

    get_node = services.get_node

    def patient(*a, **kw):
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return get_node(*a, **kw)
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    services.get_node = patient


def write_table(path: str, rows: int) -> None:
    """`rows` prompts of ~60 characters, a tenth of them with their own seed and n = 1."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    ids = pa.array([f"p{i:07d}" for i in range(rows)])
    prompts = pa.array([f"A photo of object number {i} on a plain table, studio light." for i in range(rows)])
    seeds = pa.array([i if i % 10 == 0 else None for i in range(rows)], pa.int64())
    table = pa.table({"id": ids, "prompt": prompts, "seed": seeds})
    if path.endswith(".csv"):
        pacsv.write_csv(table, path)
    else:
        pq.write_table(table, path)


class OneByOneGenerator:
    """No models: a 1x1 image per request, its colour from the seed."""

    def __init__(self, **kw):
        pass

    def __call__(self, batch):
        from tarflow.data.schema import GENERATED_ROWS

        rows = batch.to_pylist()
        for r in rows:
            r.update(ok=False, codes=None, codes_fix=None, width=None, height=None, pixels=None)
            if r["kind"] == "sample" and r["error_reason"] is None:
                px = np.random.default_rng(r["seed"]).integers(0, 255, (1, 1, 3), dtype=np.uint8)
                r.update(ok=True, codes=[0], codes_fix="ok", width=1, height=1, pixels=px.tobytes())
        return pa.Table.from_pylist(rows, schema=GENERATED_ROWS)


def run_job(table: str, out: str, samples_per_shard: int, batch_size: int) -> dict:
    """One generate job, in this process; returns its figures."""
    from tarflow.models import demo
    from tarflow.pipelines.generate import GenerateConfig, run_generate
    from tarflow.pipelines.runtime import init_ray

    os.environ["PYTHONPATH"] = os.pathsep.join([ROOT] + [x for x in [os.environ.get("PYTHONPATH")] if x])
    cfg = GenerateConfig(prompts=table, output=out, mllm=str(demo.ensure_demo_tar()),
                         tatok=str(demo.ensure_random_tatok()), ar_detok=str(demo.ensure_demo_ar_detok()),
                         vq=str(demo.ensure_demo_vq()), samples_per_shard=samples_per_shard, batch_size=batch_size,
                         num_workers=1, progress_every_s=60)
    before = peak_rss_mb()
    patient_ray_start()
    init_ray(progress_bars=False)
    t0 = time.time()
    summary = run_generate(cfg, generator_cls=OneByOneGenerator)
    return {"rows": summary.samples_in, "ok": summary.samples_ok, "shards": summary.shards_done,
            "seconds": round(time.time() - t0, 1), "driver_bytes": summary.driver_bytes,
            "peak_rss_mb_before_ray": round(before, 1), "peak_rss_mb": round(peak_rss_mb(), 1)}


def driver_side(table: str, out: str, samples_per_shard: int) -> dict:
    """Without Ray (for a machine where Ray cannot start): the index task's function run in a child process, as
    a worker would, and in this process what the driver does with its answer (cut the shards, build the
    stages' shard descriptors)."""
    import pickle

    from tarflow.pipelines.generate import RequestDefaults, plan_output_shards

    t0 = time.time()
    staged = os.path.join(out, "_prompts", "staged.parquet")
    code = ("import pickle, sys; from tarflow.pipelines.generate import RequestDefaults, index_prompt_table; "
            "sys.stdout.buffer.write(pickle.dumps(index_prompt_table(sys.argv[1], sys.argv[2], "
            "RequestDefaults(1, 0, 1, frozenset({1, 2, 3})))))")
    index = pickle.loads(subprocess.run([sys.executable, "-c", code, table, staged], cwd=ROOT, check=True,
                                        capture_output=True).stdout)
    shards = plan_output_shards(index["groups"], samples_per_shard, 1)
    return {"rows": sum(r for r, _ in index["groups"]), "row_groups": len(index["groups"]), "shards": len(shards),
            "driver_holds_bytes": len(pickle.dumps(index)) + len(pickle.dumps(shards)),
            "seconds": round(time.time() - t0, 1), "peak_rss_mb": round(peak_rss_mb(), 1)}


def old_driver(table: str) -> dict:
    """The first round's driver up to the job's start: the table as dicts, expanded into requests, cut into shards
    (the functions are still there, for small tables and tests)."""
    from tarflow.pipelines.generate import expand_requests, read_prompt_table, shard_requests

    t0 = time.time()
    rows = read_prompt_table(table)
    shards = shard_requests(expand_requests(rows, 1, 0, 1, {1, 2, 3}), 10000)
    return {"rows": len(rows), "shards": len(shards), "seconds": round(time.time() - t0, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="10000,1000000")
    p.add_argument("--format", choices=["csv", "parquet"], default="csv")
    p.add_argument("--samples-per-shard", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=2000)
    p.add_argument("--no-ray", action="store_true",
                   help="measure the driver's side without Ray (the index task run in a child process)")
    p.add_argument("--child", nargs=3, metavar=("MODE", "TABLE", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        mode, table, out = args.child
        res = (run_job(table, out, args.samples_per_shard, args.batch_size) if mode == "job" else
               driver_side(table, out, args.samples_per_shard) if mode == "driver" else old_driver(table))
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        for n in (int(x) for x in args.rows.split(",")):
            table = os.path.join(tmp, f"prompts-{n}.{args.format}")
            # in a process of its own: a child's peak RSS starts from its parent's (Linux keeps the high-water
            # mark across fork and exec), so this process stays small
            subprocess.run([sys.executable, "-c", f"from bench.generate_driver import write_table; "
                            f"write_table({table!r}, {n})"], cwd=ROOT, check=True)
            for mode in ("driver" if args.no_ray else "job", "old"):
                cmd = [sys.executable, "-m", "bench.generate_driver", "--samples-per-shard",
                       str(args.samples_per_shard), "--batch-size", str(args.batch_size), "--child", mode, table,
                       os.path.join(tmp, f"out-{n}")]
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if proc.returncode or not line:
                    print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                    return 1
                results[(n, mode)] = json.loads(line[0][7:])
                print(f"{n:>9} rows  {mode:<3}: {results[(n, mode)]}", flush=True)
    sizes = sorted({n for n, _ in results})
    if len(sizes) >= 2:
        lo, hi = sizes[0], sizes[-1]
        new = "driver" if args.no_ray else "job"
        d = results[(hi, new)]["peak_rss_mb"] - results[(lo, new)]["peak_rss_mb"]
        print(f"generate driver peak RSS, {hi} rows - {lo} rows: {d:+.1f} MB (target < 100 MB); the first round's "
              f"driver before starting: {results[(hi, 'old')]['peak_rss_mb'] - results[(lo, 'old')]['peak_rss_mb']:+.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
