"""The pipeline's own ceiling on a simulated multi-node cluster (ray.cluster_utils.Cluster on this machine):
images/s through read, decode, assemble and write with a no-op encoder, and the driver's CPU share, for
today's design (workers write: PartWriter + finalize tasks) side by side with the first round's (every row
pulled into the driver, which assembles and writes each shard itself), in one run.

    python -m bench.pipeline [--shards 12] [--per-shard 40] [--size 256] [--nodes 2]

Both designs run the same stages on the same shards; only where the rows go after the encoder differs.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

from tarflow.data.schema import tokenize_encoded_rows
from tarflow.pipelines.tokenize import TATokEncoder


class NoopEncoder(TATokEncoder):
    """Zeros for codes, no model: what is left is the pipeline itself."""

    def __init__(self, checkpoint, scales, codebook_size: int = 512, num_tokens: int = 81, row_bytes: int = 0, **_):
        from tarflow.data import schema

        self.ballast = b"x" * row_bytes  # what a generated image or a long caption adds to a row
        self.scales = [int(s) for s in scales]
        self.schema = tokenize_encoded_rows(self.scales, codebook_size)
        self.code_type = schema.code_value_type(codebook_size)
        self.num_tokens = num_tokens

    def __call__(self, batch: pa.Table) -> pa.Table:
        from tarflow.data import schema
        from tarflow.pipelines.tokenize import _code_lists

        ok = batch.column("ok").to_numpy(zero_copy_only=False)
        idx_ok = np.flatnonzero(ok)
        out = batch.drop_columns(["pixels", "vq_pixels"])
        for s in self.scales:
            codes = np.zeros((len(idx_ok), self.num_tokens), np.int64)
            out = out.append_column(schema.code_column(s), _code_lists(codes, idx_ok, ok, self.num_tokens,
                                                                       self.code_type))
        out = out.select(self.schema.names).cast(self.schema)
        return out.append_column("ballast", pa.array([self.ballast] * len(out), pa.binary())) if self.ballast else out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_workers_write(cfg, facts, row_bytes: int) -> dict:
    from tarflow.pipelines.tokenize import run_tokenize

    t, c = time.time(), _cpu_seconds()
    s = run_tokenize(cfg, encoder_cls=NoopEncoder, encoder_kwargs={"row_bytes": row_bytes})
    wall = time.time() - t
    return {"images": s.samples_ok, "seconds": wall, "images_per_s": s.samples_ok / wall,
            "driver_cpu_share": (_cpu_seconds() - c) / wall, "driver_bytes": s.driver_bytes}


def run_driver_writes(cfg, facts, row_bytes: int) -> dict:
    """The first round's design: the same stages, then every row into the driver, which assembles each shard
    and writes it (outputs, then manifest) before taking the next batch."""
    import pyarrow.compute as pc

    from tarflow.data.codeshard import CodeShardWriter, code_shard_layout
    from tarflow.data.img2dataset import resolve_inputs
    from tarflow.pipelines.sharded import ShardJob, dedupe_by_index
    from tarflow.pipelines.tokenize import build_dataset

    shards = resolve_inputs(cfg.input)
    layout = code_shard_layout(cfg.output)
    spec = ShardJob(job="tokenize", layout=layout, facts=facts.facts(), sources={}, writer=CodeShardWriter(facts))
    t, c = time.time(), _cpu_seconds()
    ds = build_dataset(shards, cfg, facts, parts_dir=None, encoder_cls=NoopEncoder,
                       encoder_kwargs={"row_bytes": row_bytes})
    parts, ends, n, driver_bytes = {}, {}, 0, 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        driver_bytes += batch.nbytes
        samples = batch.filter(pc.equal(batch.column("kind"), "sample"))
        for shard in pc.unique(samples.column("shard")).to_pylist():
            parts.setdefault(shard, []).append(samples.filter(pc.equal(samples.column("shard"), shard)))
        for r in batch.filter(pc.equal(batch.column("kind"), "end")).select(["shard", "end_info"]).to_pylist():
            ends[r["shard"]] = json.loads(r["end_info"])
        for shard in [s for s, e in ends.items() if sum(len(p) for p in parts.get(s, [])) >= e["n_samples"]]:
            rows = dedupe_by_index(pa.concat_tables(parts.pop(shard)))
            written = spec.writer(shard, rows, ends.pop(shard), layout.paths(shard))
            from tarflow.data import storage

            storage.write_bytes_atomic(layout.manifest_path(shard), json.dumps(written.counts).encode())
            n += written.counts["ok"]
    wall = time.time() - t
    return {"images": n, "seconds": wall, "images_per_s": n / wall, "driver_cpu_share": (_cpu_seconds() - c) / wall,
            "driver_bytes": driver_bytes}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=12)
    p.add_argument("--per-shard", type=int, default=40)
    p.add_argument("--size", type=int, default=256, help="JPEG side in pixels")
    p.add_argument("--nodes", type=int, default=2, help="worker nodes besides the (driver-only) head")
    p.add_argument("--cpus-per-node", type=float, default=1)
    p.add_argument("--row-bytes", type=int, default=200_000,
                   help="payload added to each row after the encoder, as a generated PNG or a caption would")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import ray
    from ray.cluster_utils import Cluster

    from bench.common import photo_like_jpegs, results_path, write_shards
    from tarflow.models.demo import ensure_random_tatok
    from tarflow.pipelines.tokenize import TokenizeConfig, model_facts

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ["PYTHONPATH"] = os.pathsep.join([root] + [x for x in [os.environ.get("PYTHONPATH")] if x])
    work = tempfile.mkdtemp(prefix="tarflow-bench-pipeline-")
    write_shards(os.path.join(work, "in"), photo_like_jpegs(args.shards * args.per_shard, args.size), args.per_shard)
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=0, gcs_server_port=_free_port(), node_ip_address="127.0.0.1", include_dashboard=False,
        object_store_memory=300 << 20, temp_dir=os.path.join(work, "ray")))
    for _ in range(args.nodes):
        cluster.add_node(num_cpus=args.cpus_per_node, node_ip_address="127.0.0.1", object_store_memory=300 << 20)
    results = {}
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        for design, fn in (("driver_writes", run_driver_writes), ("workers_write", run_workers_write)):
            cfg = TokenizeConfig(input=os.path.join(work, "in"), output=os.path.join(work, design),
                                 tatok=str(ensure_random_tatok()), scales=[3], decode_batch_size=16,
                                 encode_batch_size=32, progress_every_s=1e9, cpus_per_encoder=0.25,
                                 decode_cpus=0.5, num_encoders=1)
            results[design] = fn(cfg, model_facts(cfg), args.row_bytes)
            print(design, json.dumps({k: round(v, 3) if isinstance(v, float) else v
                                      for k, v in results[design].items()}), file=sys.stderr)
    finally:
        ray.shutdown()
        cluster.shutdown()
    old, new = results["driver_writes"], results["workers_write"]
    results["ratio_images_per_s"] = new["images_per_s"] / old["images_per_s"]
    results["ratio_driver_cpu_share"] = new["driver_cpu_share"] / max(old["driver_cpu_share"], 1e-9)
    results["ratio_driver_bytes"] = new["driver_bytes"] / max(old["driver_bytes"], 1)
    results["setup"] = vars(args)
    out = results_path(args.json, "pipeline.json")
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=2)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
