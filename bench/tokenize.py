"""CPU benchmark: the tokenize job on Ray Data vs the plain single-process loop, same shards, same run.

    python bench/tokenize.py [--images 256 --per-shard 32 --size 256]

Uses the small random-weight TA-Tok (the default model of `make run`). Prints images/s of both and the ratio.
"""
from __future__ import annotations

import os
import sys

# This file's name shadows the standard library's `tokenize`: take its folder off the path, import by package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from bench.common import photo_like_jpegs, plain_loop, write_shards  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--per-shard", type=int, default=32)
    p.add_argument("--size", type=int, default=256, help="JPEG side in pixels")
    p.add_argument("--scales", default="1,2,3")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", default=None, help="write the results here too")
    args = p.parse_args()
    scales = [int(s) for s in args.scales.split(",")]

    from tarflow.models.demo import ensure_random_tatok
    from tarflow.pipelines.runtime import init_ray
    from tarflow.pipelines.tokenize import TokenizeConfig, run_tokenize

    tatok = str(ensure_random_tatok())
    work = tempfile.mkdtemp(prefix="tarflow-bench-")
    try:
        write_shards(os.path.join(work, "in"), photo_like_jpegs(args.images, args.size), args.per_shard)
        n_plain, s_plain = plain_loop(os.path.join(work, "in"), tatok, os.path.join(work, "plain"), scales,
                                      args.batch_size)
        init_ray(progress_bars=False)
        import ray

        ray.data.DataContext.get_current().enable_progress_bars = False
        t0 = time.time()
        summary = run_tokenize(TokenizeConfig(input=os.path.join(work, "in"), output=os.path.join(work, "job"),
                                              tatok=tatok, scales=scales, encode_batch_size=args.batch_size,
                                              progress_every_s=1e9))
        s_job = time.time() - t0
        assert summary.samples_ok == n_plain == args.images, (summary.samples_ok, n_plain)
        res = {"images": args.images, "cpus": os.cpu_count(), "plain_images_per_s": n_plain / s_plain,
               "job_images_per_s": summary.samples_ok / s_job,
               "job_steady_images_per_s": summary.steady_images_per_s}
        res["job_over_plain"] = res["job_images_per_s"] / res["plain_images_per_s"]
        print(f"plain loop : {res['plain_images_per_s']:8.1f} images/s ({n_plain} in {s_plain:.1f} s)")
        print(f"tokenize job: {res['job_images_per_s']:8.1f} images/s ({summary.samples_ok} in {s_job:.1f} s, "
              "Ray start excluded, model load included)")
        print(f"tokenize job, once started (first to last shard written): {summary.steady_images_per_s:.1f} images/s")
        print(f"ratio job/plain: {res['job_over_plain']:.2f} "
              f"(steady: {res['job_steady_images_per_s'] / res['plain_images_per_s']:.2f})")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=2)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
