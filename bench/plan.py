"""Planning at corpus scale, against a local S3 server (moto on 127.0.0.1): resolving inputs and deciding
which shards are done, today's listing-based planner side by side with the per-shard requests of the first
round (a HEAD per input shard, then a GET per manifest, missing or not).

    python -m bench.plan [--shards 20000] [--done-fraction 0.5]

Prints plan seconds and requests per shard for both; the goal is 100,000 shards planned in under a minute.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=20000)
    p.add_argument("--done-fraction", type=float, default=0.5)
    p.add_argument("--baseline-sample", type=int, default=None,
                   help="time the per-shard planner on every k-th shard only (its cost is linear per shard) and "
                        "scale up: the first round's planner takes an hour at 20,000 shards against moto")
    args = p.parse_args(argv)

    port = _free_port()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        import boto3

        from tarflow.data import storage
        from tarflow.data.img2dataset import resolve_inputs
        from tarflow.pipelines.sharded import ShardLayout, plan_shards

        boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="bench")
        fs, _ = storage.filesystem("s3://bench/x")
        names = [f"{i:06d}" for i in range(args.shards)]
        done = set(names[: int(args.shards * args.done_fraction)])
        facts = {"model": {"sha256": "0" * 64}}
        layout = ShardLayout("s3://bench/out", (("codes", "codes/{shard}.parquet"),), "bench.manifest", 1)
        t = time.time()
        objects = {f"bench/in/{n}.tar": b"x" * 10 for n in names}
        objects.update({f"bench/out/_manifest/{n}.json": json.dumps(
            {"format": "bench.manifest", "version": 1, "input": {"size": 10}, **facts}).encode() for n in done})
        fs.pipe(objects)
        print(f"made {len(names)} input shards and {len(done)} manifests in {time.time() - t:.1f} s")

        counts = {"n": 0}
        real_call = fs._call_s3

        async def counting(method, *a, **kw):
            counts["n"] += 1
            return await real_call(method, *a, **kw)

        fs._call_s3 = counting
        results = {}

        fs.invalidate_cache()
        counts["n"], t = 0, time.time()
        shards = resolve_inputs("s3://bench/in/")
        plan = plan_shards(layout, [s.name for s in shards], facts, lambda n, m: True, overwrite=False)
        results["listing"] = (time.time() - t, counts["n"], len(plan.done))

        fs.invalidate_cache()
        counts["n"], t = 0, time.time()
        listed = sorted(storage.listdir("s3://bench/in/"))  # the first round: a listing, then per shard
        step = max(1, args.shards // args.baseline_sample) if args.baseline_sample else 1
        listed = listed[::step]
        n_done = 0
        for path in listed:
            storage.size(path)
            try:
                json.loads(storage.read_bytes(layout.manifest_path(os.path.basename(path)[:-4])))
                n_done += 1
            except FileNotFoundError:
                pass
        results["per_shard"] = ((time.time() - t) * step, counts["n"] * step, n_done * step)

        for name, (secs, requests, n_done) in results.items():
            scaled = " (sampled, scaled up)" if name == "per_shard" and args.baseline_sample else ""
            print(f"{name:>10}: {secs:7.2f} s{scaled}, {requests / args.shards:.3f} requests/shard, {n_done} done found, "
                  f"100,000 shards at this rate: {secs / args.shards * 1e5:.0f} s")
        speedup = results["per_shard"][0] / max(results["listing"][0], 1e-9)
        print(f"listing-based planning is {speedup:.1f}x faster, with "
              f"{results['per_shard'][1] / max(results['listing'][1], 1):.1f}x fewer requests")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
