"""Planning at corpus scale: resolving inputs, checking them and deciding which shards are done, on a local
folder of empty files or a local S3 server (moto on 127.0.0.1), with the driver's peak RSS and the requests made.

    python -m bench.plan [--shards 100000] [--done-fraction 0.5] [--store local|s3|both] [--planner now|before|both]
    python -m bench.plan --shards 20000 --store s3 --per-shard-baseline --baseline-sample 2000

Each planner runs in a fresh child process (the store is made by this one, and moto serves from it), so the
child's peak RSS (ru_maxrss) is the driver's planning alone, imports included. Planners:

- now: the jobs' driver today: inputs resolved once by the check (sizes from listings and globs, a few
  Parquet footers at once) and passed to the job; manifests read 1,000 at a time, only the decision kept.
- before: issue 21's starting point: inputs resolved twice (the check, then the job), every parquet footer
  opened in turn, every existing manifest read into memory at once.
- --per-shard-baseline: the first round's planner (a HEAD per input shard, a GET per manifest, missing or
  not), S3 only, timed on every k-th shard with --baseline-sample and scaled up.

Requests: S3 requests (s3fs calls) on S3; on the local folder, the planner's filesystem calls (listings, stats,
opens; not the stat per entry a local listing makes inside).
Manifests are ~2.5 KB each, as the tokenize job writes them.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

MANIFEST_PAD = 2000  # bytes of counts/outputs/sources a real tokenize manifest carries beyond the facts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _manifest(name: str, facts: dict) -> bytes:
    return json.dumps({"format": "bench.manifest", "version": 1, "shard": name, "input": {"size": 0}, **facts,
                       "outputs": {"codes": {"path": f"codes/{name}.parquet", "bytes": 123456, "rows": 10000}},
                       "sources": {"tatok": "s3://models/ta_tok.pth" + " " * MANIFEST_PAD}}, indent=2).encode()


FACTS = {"model": {"sha256": "0" * 64}}


def _layout(root: str):
    from tarflow.data.shards import ShardLayout

    return ShardLayout(root.rstrip("/") + "/out", (("codes", "codes/{shard}.parquet"),), "bench.manifest", 1)


def make_store(store: str, root: str, n: int, done_fraction: float) -> None:
    names = [f"{i:06d}" for i in range(n)]
    done = names[: int(n * done_fraction)]
    t = time.time()
    if store == "local":
        os.makedirs(f"{root}/in", exist_ok=True)
        os.makedirs(f"{root}/out/_manifest", exist_ok=True)
        for name in names:
            open(f"{root}/in/{name}.tar", "wb").close()
        for name in done:
            with open(f"{root}/out/_manifest/{name}.json", "wb") as f:
                f.write(_manifest(name, FACTS))
    else:
        from tarflow.data import storage

        fs, _ = storage.filesystem(root + "/x")
        bucket = root.removeprefix("s3://").split("/")[0]
        objects = {f"{bucket}/in/{name}.tar": b"" for name in names}
        objects.update({f"{bucket}/out/_manifest/{name}.json": _manifest(name, FACTS) for name in done})
        keys = list(objects)
        for i in range(0, len(keys), 5000):
            fs.pipe({k: objects[k] for k in keys[i:i + 5000]})
    print(f"{store}: made {n} empty input shards and {len(done)} manifests in {time.time() - t:.0f} s", flush=True)


# ----------------------------------------------------------------------------------------------------------
# The child: one planner, measured


def _count_requests(store: str) -> dict:
    counts = {"n": 0}
    if store == "s3":
        import s3fs

        real = s3fs.S3FileSystem._call_s3

        async def counting(self, method, *a, **kw):
            counts["n"] += 1
            return await real(self, method, *a, **kw)

        s3fs.S3FileSystem._call_s3 = counting
    else:
        from fsspec.implementations.local import LocalFileSystem

        depth = [0]  # the planner's own calls; not the stat per entry that a local listing makes inside
        for name in ("ls", "info", "_open", "cat_file", "exists", "isdir", "glob", "find", "rm_file"):
            real = getattr(LocalFileSystem, name)

            def counting(self, *a, _real=real, **kw):
                counts["n"] += depth[0] == 0
                depth[0] += 1
                try:
                    return _real(self, *a, **kw)
                finally:
                    depth[0] -= 1

            setattr(LocalFileSystem, name, counting)
    return counts


def plan_now(root: str):
    from tarflow.pipelines import checks
    from tarflow.pipelines.sharded import plan_shards
    from tarflow.preflight import Problems

    shards = checks.check_img2dataset_input(Problems(), [root + "/in/"], "auto")  # the job's check, resolving once
    by_name = {s.name: s for s in shards}
    return plan_shards(_layout(root), by_name, FACTS,
                       lambda n, m: m.get("input", {}).get("size") == by_name[n].size, overwrite=False)


def plan_before(root: str):
    """Issue 21's starting point, reproduced: resolved twice, footers opened in turn, manifests all in memory."""
    from tarflow.data import storage
    from tarflow.data.img2dataset import resolve_inputs
    from tarflow.pipelines.checks import _is_code_shard
    from tarflow.data.shards import facts_mismatch
    from tarflow.pipelines.sharded import Plan

    for s in resolve_inputs([root + "/in/"], "auto"):  # the check
        if s.format == "parquet" and _is_code_shard(s.path):
            break
    shards = resolve_inputs([root + "/in/"], "auto")  # the job, again
    by_name = {s.name: s for s in shards}
    layout = _layout(root)
    listed = {os.path.basename(p) for p in storage.list_sizes(storage.join(layout.output, "_manifest"))}
    existing = [n for n in by_name if f"{n}.json" in listed]
    contents = storage.read_many([layout.manifest_path(n) for n in existing])
    finished = set()
    for name in existing:
        path = layout.manifest_path(name)
        m = layout.parse_manifest(contents[path], path)
        if not facts_mismatch(FACTS, m, 1) and m["input"]["size"] == by_name[name].size:
            finished.add(name)
    return Plan(todo=[n for n in by_name if n not in finished], done=[n for n in by_name if n in finished])


def child(store: str, root: str, planner: str) -> None:
    import resource

    import tarflow.pipelines.checks  # noqa: F401 - imports before the baseline
    import tarflow.pipelines.sharded  # noqa: F401

    counts = _count_requests(store)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.time()
    plan = (plan_now if planner == "now" else plan_before)(root)
    secs = time.time() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": secs, "requests": counts["n"], "peak_rss_mb": peak / 1024,
                      "imports_rss_mb": base / 1024, "todo": len(plan.todo), "done": len(plan.done)}))


def run_child(store: str, root: str, planner: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.plan", "--child", store, root, planner], text=True,
                         capture_output=True, env=os.environ)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def per_shard_baseline(root: str, n: int, sample: int | None) -> dict:
    """The first round's planner on S3: a listing, then a HEAD per input and a GET per manifest."""
    from tarflow.data import storage

    counts = _count_requests("s3")
    layout = _layout(root)
    listed = sorted(storage.listdir(root + "/in/"))
    step = max(1, n // sample) if sample else 1
    t, n_done = time.time(), 0
    for path in listed[::step]:
        storage.size(path)
        try:
            json.loads(storage.read_bytes(layout.manifest_path(os.path.basename(path)[:-4])))
            n_done += 1
        except FileNotFoundError:
            pass
    return {"seconds": (time.time() - t) * step, "requests": counts["n"] * step, "done": n_done * step,
            "peak_rss_mb": float("nan"), "imports_rss_mb": float("nan")}


def main(argv=None) -> int:
    if argv is None and sys.argv[1:2] == ["--child"]:
        child(*sys.argv[2:5])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=100_000)
    p.add_argument("--done-fraction", type=float, default=0.5)
    p.add_argument("--store", choices=("local", "s3", "both"), default="both")
    p.add_argument("--planner", choices=("now", "before", "both"), default="both")
    p.add_argument("--per-shard-baseline", action="store_true", help="also the first round's per-shard planner (S3)")
    p.add_argument("--baseline-sample", type=int, default=None,
                   help="time the per-shard planner on every k-th shard only and scale up (its cost is per shard)")
    args = p.parse_args(argv)
    planners = ["now", "before"] if args.planner == "both" else [args.planner]
    stores = ["local", "s3"] if args.store == "both" else [args.store]
    rows = []
    for store in stores:
        with tempfile.TemporaryDirectory(prefix="bench-plan-") as tmp:
            server = None
            if store == "s3":
                import logging

                from moto.server import ThreadedMotoServer

                port = _free_port()
                os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                                   "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
                logging.getLogger("werkzeug").setLevel(logging.ERROR)
                server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
                server.start()
                import boto3

                boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="bench")
                root = "s3://bench"
            else:
                root = tmp
            try:
                make_store(store, root, args.shards, args.done_fraction)
                for planner in planners:
                    r = run_child(store, root, planner)
                    rows.append((store, planner, r))
                    print(f"{store:>5} {planner:>6}: {r['seconds']:7.1f} s, {r['requests']:>7} requests "
                          f"({r['requests'] / args.shards:.4f} per shard), peak RSS {r['peak_rss_mb']:.0f} MB "
                          f"(imports alone {r['imports_rss_mb']:.0f} MB), {r['done']} done found", flush=True)
                if store == "s3" and args.per_shard_baseline:
                    r = per_shard_baseline(root, args.shards, args.baseline_sample)
                    rows.append((store, "per-shard", r))
                    print(f"   s3 per-shard (first round{', sampled, scaled up' if args.baseline_sample else ''}): "
                          f"{r['seconds']:.1f} s, {r['requests']} requests ({r['requests'] / args.shards:.3f} per "
                          f"shard)", flush=True)
            finally:
                if server is not None:
                    server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
