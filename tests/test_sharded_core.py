"""The sharded-job core: assembly from replayed parts, planning from listings, workers writing, shards failing
alone, streaming shard completion."""
from __future__ import annotations

import json
import os

import pyarrow as pa
import pytest

from tarflow.data import storage
from tarflow.models.demo import ensure_random_tatok
from tarflow.pipelines import sharded
from tarflow.pipelines.sharded import pools
from tarflow.data.shards import ShardLayout, ShardWritten
from tarflow.pipelines.sharded import OutputConflict, PartWriter, ShardJob

ROWS = pa.schema([pa.field("shard", pa.string()), pa.field("idx", pa.int64()), pa.field("key", pa.string()),
                  pa.field("kind", pa.string()), pa.field("end_info", pa.string()), pa.field("v", pa.string())])


def _rows(shard, idxs):
    return pa.Table.from_pylist([{"shard": shard, "idx": i, "key": f"k{i}", "kind": "sample", "v": f"{shard}/{i}"}
                                 for i in idxs], schema=ROWS)


def _layout(out):
    return ShardLayout(str(out), (("data", "data/{shard}.json"),), "test.manifest", 1)


def _write_json(shard, rows, end, paths):
    data = json.dumps(rows.column("v").to_pylist()).encode()
    storage.write_bytes_atomic(paths["data"], data)
    return ShardWritten(outputs={"data": {"path": paths["data"], "bytes": len(data)}},
                        counts={"samples_in": len(rows), "ok": len(rows), "failed": 0, "failed_by_reason": {}})


def test_replayed_and_interleaved_parts_assemble_each_index_once(tmp_path):
    """Blocks of two shards interleaved, one block replayed (a retried task) and one overlapping another: the
    finalized shard holds each index once, in order, and its parts are gone."""
    parts = str(tmp_path / "parts")
    writer = PartWriter(parts)
    metas = []
    for block in (pa.concat_tables([_rows("a", [3, 4]), _rows("b", [0])]), _rows("a", [0, 1, 2]),
                  _rows("a", [3, 4]), pa.concat_tables([_rows("b", [1]), _rows("a", [2, 3])])):
        metas += writer(block).to_pylist()
    a_parts = [m["path"] for m in metas if m["shard"] == "a"]
    assert len(a_parts) == 4 and sorted({i for m in metas if m["shard"] == "a" for i in m["idx"]}) == [0, 1, 2, 3, 4]
    spec = ShardJob(job="t", layout=_layout(tmp_path / "out"), facts={"f": 1}, sources={}, writer=_write_json)
    done = sharded.finalize_shard(spec, "a", {"path": "in/a"}, a_parts, {"n_samples": 5})
    assert done["counts"]["samples_in"] == 5
    assert json.loads((tmp_path / "out" / "data" / "a.json").read_text()) == [f"a/{i}" for i in range(5)]
    manifest = json.loads((tmp_path / "out" / "_manifest" / "a.json").read_text())
    assert manifest["f"] == 1 and manifest["complete"] and manifest["input"] == {"path": "in/a"}
    assert not any(os.path.exists(p) for p in a_parts)
    with pytest.raises(RuntimeError, match="expected 3"):  # a shard is never written short
        sharded.finalize_shard(spec, "b", {}, [m["path"] for m in metas if m["shard"] == "b"], {"n_samples": 3})


def test_a_retried_finalize_after_its_manifest_reports_that_shard_once(tmp_path):
    """Ray retries a finalize task whose node died; if the first attempt had written the manifest and dropped
    the parts, the retry reports that shard as written (found in a node-removal run: a whole shard was
    reported `write_failed` although it was finished). A manifest from another run does not count."""
    parts = [m["path"] for m in PartWriter(str(tmp_path / "parts"))(_rows("a", [0, 1])).to_pylist()]
    spec = ShardJob(job="t", layout=_layout(tmp_path / "out"), facts={}, sources={}, writer=_write_json, run="r1")
    first = sharded.finalize_shard(spec, "a", {}, parts, {"n_samples": 2})
    assert json.loads((tmp_path / "out" / "_manifest" / "a.json").read_text())["run"] == "r1"
    assert sharded.finalize_shard(spec, "a", {}, parts, {"n_samples": 2}) == first
    other = ShardJob(job="t", layout=_layout(tmp_path / "out"), facts={}, sources={}, writer=_write_json, run="r2")
    with pytest.raises(FileNotFoundError):
        sharded.finalize_shard(other, "a", {}, parts, {"n_samples": 2})


def test_a_stalled_job_says_so_with_the_free_resources(caplog):
    """No row for `after_s`: a warning naming what is free (a pool holding every CPU starves the other stages);
    rows arriving keep it quiet."""
    import logging
    import time

    resources = lambda: ({"CPU": 0.0}, {"CPU": 1.0, "GPU": 2.0})  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="tarflow"):
        with sharded.StallWatch("tokenize", 0.4, resources) as busy:
            for _ in range(8):
                time.sleep(0.1)
                busy.beat()
        assert busy.warnings == 0
        with sharded.StallWatch("tokenize", 0.4, resources) as stalled:
            time.sleep(1.0)
    assert stalled.warnings >= 1
    assert "tokenize: no rows for" in caplog.text and "CPU 0 free of 1" in caplog.text and "GPU 0 free of 2" in caplog.text


def test_planning_lists_once_and_reads_only_existing_manifests(tmp_path, monkeypatch):
    layout = _layout(tmp_path)
    spec = ShardJob(job="t", layout=layout, facts={"f": 1}, sources={}, writer=_write_json)
    for s in ("00001", "00003"):
        parts = PartWriter(str(tmp_path / "_parts"))(_rows(s, [0, 1])).to_pylist()
        sharded.finalize_shard(spec, s, {"size": 10}, [m["path"] for m in parts], {"n_samples": 2})
    storage.write_bytes_atomic(layout.manifest_path("00004"), b"{not json")  # damaged from outside
    reads = []
    real = storage.read_many
    monkeypatch.setattr(storage, "read_many", lambda paths, **kw: reads.extend(paths) or real(paths, **kw))
    names = [f"{i:05d}" for i in range(6)]
    plan = sharded.plan_shards(layout, names, {"f": 1}, lambda n, m: True, overwrite=False)
    assert plan.done == ["00001", "00003"] and plan.todo == ["00000", "00002", "00004", "00005"]
    assert sorted(os.path.basename(p) for p in reads) == ["00001.json", "00003.json", "00004.json"]
    assert not os.path.exists(layout.manifest_path("00004"))  # the damaged one is redone
    changed = sharded.plan_shards(layout, names, {"f": 1}, lambda n, m: n != "00003", overwrite=False)
    assert changed.done == ["00001"] and "00003" in changed.todo
    sharded.finalize_shard(spec, "00003", {"size": 10}, [m["path"] for m in PartWriter(str(tmp_path / "_p"))(
        _rows("00003", [0, 1])).to_pylist()], {"n_samples": 2})
    with pytest.raises(OutputConflict, match=r"f 1 != 2"):
        sharded.plan_shards(layout, names, {"f": 2}, lambda n, m: True, overwrite=False)
    redo = sharded.plan_shards(layout, names, {"f": 2}, lambda n, m: True, overwrite=True)
    assert redo.done == [] and not os.path.exists(layout.manifest_path("00001"))


def test_pool_requests_gpus_the_autoscaler_offers_even_when_none_is_up(ray_local, monkeypatch):
    monkeypatch.setattr(pools, "autoscaler_max_resources", lambda: {"GPU": 16, "CPU": 64})
    pool = sharded.plan_pool("auto")
    assert (pool.gpus_per_worker, pool.min_workers, pool.max_workers) == (1.0, 1, 16)
    assert sharded.plan_pool("auto", max_workers=4, min_workers=2).concurrency == (2, 4)
    monkeypatch.setattr(pools, "autoscaler_max_resources", lambda: {})
    assert sharded.plan_pool("auto").gpus_per_worker == 0.0  # this CPU-only test cluster
    cuda = sharded.plan_pool("cuda")  # asked for: requested even though none is up now
    assert cuda.gpus_per_worker == 1.0 and cuda.max_workers == 1
    assert sharded.plan_pool("cpu", max_workers=3).concurrency == (1, 3)


def test_a_pool_minimum_that_leaves_no_cpu_for_the_tasks_is_refused(ray_local, monkeypatch):
    """2 encoders x 0.5 CPU on a 1-CPU cluster never finish (the decoder's tasks never get a CPU): refused with
    the flags to change; the same minimum passes where the autoscaler can add CPUs."""
    from tarflow.preflight import UsageError

    monkeypatch.setattr(pools, "_cpus_by_node_kind", lambda: (1.0, 0.0))
    monkeypatch.setattr(pools, "autoscaler_max_resources", lambda: {})
    monkeypatch.setattr(pools, "autoscaler_running", lambda: False)
    pool = sharded.plan_pool("cpu", min_workers=2, max_workers=2)
    with pytest.raises(UsageError, match=r"--min-encoders 2 x --cpus-per-encoder 0.5 holds 1 of this cluster's "
                                         r"CPUs \(1 in all.*lower --min-encoders or --cpus-per-encoder"):
        sharded.check_pool_leaves_cpus(pool, 0.5, 0.25, "--min-encoders", "--cpus-per-encoder")
    sharded.check_pool_leaves_cpus(sharded.plan_pool("cpu", min_workers=1, max_workers=2), 0.5, 0.25, "a", "b")
    monkeypatch.setattr(pools, "autoscaler_max_resources", lambda: {"CPU": 8})
    sharded.check_pool_leaves_cpus(pool, 0.5, 0.25, "--min-encoders", "--cpus-per-encoder")


def test_generate_writes_each_shard_while_later_requests_are_still_generated(ray_local, tmp_path):
    """Requests stream shard after shard with each shard's end row right behind them: when the generator
    reaches the last shard, the first shard's manifest is already on disk (or arrives while it waits there; a job
    that wrote shards only at its end would never write it)."""
    import slowstages

    from tarflow.pipelines.generate import GenerateConfig, run_generate

    (tmp_path / "mllm").mkdir()
    (tmp_path / "mllm" / "config.json").write_text("{}")
    for f in ("ar.pth", "vq.pt"):
        (tmp_path / f).write_bytes(f.encode())
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"prompt {i}"}) + "\n" for i in range(16)))
    out, probe = tmp_path / "out", tmp_path / "probe.txt"
    cfg = GenerateConfig(prompts=str(prompts), output=str(out), mllm=str(tmp_path / "mllm"),
                         tatok=str(ensure_random_tatok()), ar_detok=str(tmp_path / "ar.pth"), vq=str(tmp_path / "vq.pt"),
                         samples_per_shard=4, batch_size=2, num_workers=1, progress_every_s=0)
    summary = run_generate(cfg, generator_cls=_bound(slowstages.FakeGenerator, probe=str(probe), output=str(out),
                                                     delay_s=0.4, wait_in="00003", wait_for="00000.json"))
    assert summary.shards_done == 4 and summary.samples_ok == 16
    seen_at_last_shard = [line.split(" ", 1)[1].split(",") for line in probe.read_text().splitlines()
                          if line.startswith("00003 ")]
    assert seen_at_last_shard and "00000.json" in seen_at_last_shard[-1], seen_at_last_shard
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]


def _bound(cls, **kw):
    """`cls` with extra constructor arguments fixed (run_generate passes only the model arguments)."""
    import functools

    class Bound(cls):
        __init__ = functools.partialmethod(cls.__init__, **kw)

    Bound.__name__ = cls.__name__
    return Bound


def test_planning_on_s3_makes_a_request_per_listing_page_not_per_shard(s3_bucket, monkeypatch):
    """The tokenize job's check (inputs resolved once, sizes from listings and globs) and the plan make as many
    S3 requests for 40 input shards as for 5 (one listing page each), plus one GET per finished shard's
    manifest: planning 100,000 shards costs about 100 listings (bench/plan.py measures it)."""
    import s3fs

    from tarflow.pipelines import checks
    from tarflow.preflight import Problems

    calls = []
    real = s3fs.S3FileSystem._call_s3

    async def counting(self, method, *a, **kw):
        calls.append(method)
        return await real(self, method, *a, **kw)

    fs, _ = storage.filesystem(s3_bucket + "/x")

    def requests(root: str, n: int, spec: str) -> list[str]:
        manifest = {"format": "test.manifest", "version": 1, "input": {"size": 0}, "f": 1}
        fs.pipe({**{f"{root}/in/{i:05d}.tar": b"" for i in range(n)},
                 **{f"{root}/out/_manifest/{i:05d}.json": json.dumps(manifest).encode() for i in (1, 3)}})
        fs.invalidate_cache()
        monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counting)
        calls.clear()
        p = Problems()
        shards = checks.check_img2dataset_input(p, [spec.format(root=f"s3://{root}")], "auto")
        by_name = {s.name: s for s in shards}
        plan = sharded.plan_shards(_layout(f"s3://{root}/out"), by_name, {"f": 1},
                                   lambda name, m: m["input"]["size"] == by_name[name].size, overwrite=False)
        monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", real)
        assert not p and len(shards) == n and plan.done == ["00001", "00003"], (p.lines, plan.done)
        return list(calls)

    bucket = s3_bucket.removeprefix("s3://")
    for i, spec in enumerate(("{root}/in/", "{root}/in/*.tar")):  # a folder, a glob
        few, many = requests(f"{bucket}/few{i}", 5, spec), requests(f"{bucket}/many{i}", 40, spec)
        assert len(few) == len(many) <= 8, (spec, few, many)
        assert many.count("get_object") == 2  # the two finished shards' manifests, nothing per input shard


def test_the_input_check_opens_a_few_parquet_footers_not_every_one(tmp_path, monkeypatch):
    """img2dataset Parquet input: the check that it is not a folder of code shards reads a few footers spread over
    the inputs (at once), not one per shard in turn; a folder of code shards is still named."""
    import pyarrow.parquet as pq

    from tarflow.pipelines import checks
    from tarflow.preflight import Problems

    for i in range(40):
        pq.write_table(pa.table({"jpg": [b"x"]}), tmp_path / f"{i:05d}.parquet")
    opened = []
    real = checks._is_code_shard
    monkeypatch.setattr(checks, "_is_code_shard", lambda path: opened.append(path) or real(path))
    p = Problems()
    assert len(checks.check_img2dataset_input(p, [str(tmp_path)], "parquet")) == 40 and not p
    assert 1 <= len(opened) <= checks.FOOTERS_CHECKED
    monkeypatch.setattr(checks, "_is_code_shard", lambda path: True)  # every shard a code shard
    checks.check_img2dataset_input(p, [str(tmp_path)], "parquet")
    assert len(p.lines) == 1 and "is a tarflow code shard, not img2dataset output" in p.lines[0]


class _StreamingJson:
    """A writer that takes its rows part by part (as the generate job's does), recording each table's size."""

    streams_parts = True

    def __init__(self):
        self.tables = []

    def __call__(self, shard, rows, end, paths):
        assert isinstance(rows, sharded.ShardParts)
        values = []
        for table in rows:
            self.tables.append(len(table))
            values += table.column("v").to_pylist()
        data = json.dumps(values).encode()
        storage.write_bytes_atomic(paths["data"], data)
        return ShardWritten(outputs={"data": {"path": paths["data"], "bytes": len(data)}},
                            counts={"samples_in": len(rows), "ok": len(rows), "failed": 0, "failed_by_reason": {}})


def test_a_streaming_writer_gets_one_part_at_a_time_in_index_order(tmp_path):
    """Parts whose indices interleave, one replayed: a streaming writer sees every index once, in order, in tables
    of at most one part's rows, and writes what the whole-table writer writes; a short shard is refused before
    the writer runs."""
    blocks = [_rows("a", [0, 2, 4]), _rows("a", [1, 3]), _rows("a", [0, 2, 4]), _rows("a", [5, 6, 7])]
    whole, streamed = [], []
    for out, parts in ((tmp_path / "whole", whole), (tmp_path / "streamed", streamed)):
        writer = PartWriter(str(out / "_parts"))
        for block in blocks:
            parts += [m["path"] for m in writer(block).to_pylist()]
    sharded.finalize_shard(ShardJob(job="t", layout=_layout(tmp_path / "whole"), facts={}, sources={},
                                    writer=_write_json), "a", {}, whole, {"n_samples": 8})
    stream = _StreamingJson()
    done = sharded.finalize_shard(ShardJob(job="t", layout=_layout(tmp_path / "streamed"), facts={}, sources={},
                                           writer=stream), "a", {}, streamed, {"n_samples": 8})
    assert done["counts"]["samples_in"] == 8
    got = json.loads((tmp_path / "streamed" / "data" / "a.json").read_text())
    assert got == [f"a/{i}" for i in range(8)] == json.loads((tmp_path / "whole" / "data" / "a.json").read_text())
    # 0 | 1 | 2 | 3 | 4 from the two interleaved parts (the replay dropped), then 5-7 from the last part whole
    assert stream.tables == [1, 1, 1, 1, 1, 3]
    parts = [m["path"] for m in PartWriter(str(tmp_path / "p"))(_rows("b", [0, 1])).to_pylist()]
    short = _StreamingJson()
    with pytest.raises(RuntimeError, match="expected 3"):
        sharded.finalize_shard(ShardJob(job="t", layout=_layout(tmp_path / "short"), facts={}, sources={},
                                        writer=short), "b", {}, parts, {"n_samples": 3})
    assert short.tables == [] and not (tmp_path / "short" / "data").exists()


def _generated_parts(parts_dir, blocks):
    """Parts of the generate job's last stage: per block (first, last) indices; the last row of a block fails."""
    import io

    from PIL import Image

    from tarflow.data.schema import GENERATE_ENCODED_ROWS

    writer, paths, images = PartWriter(str(parts_dir)), [], {}
    for first, last in blocks:
        rows = []
        for i in range(first, last + 1):
            ok = i != last
            buf = io.BytesIO()
            Image.new("RGB", (2, 2), (i, 2 * i, 3 * i)).save(buf, format="PNG")
            images[f"00000{i:04d}"] = buf.getvalue()
            rows.append({"shard": "00000", "idx": i, "key": f"00000{i:04d}", "kind": "sample", "id": f"p{i}",
                         "index": 0, "prompt": f"prompt {i}", "scale": 1, "seed": i, "ok": ok,
                         "codes": [i, i + 1] if ok else None, "codes_fix": "ok" if ok else None,
                         "width": 2 if ok else None, "height": 2 if ok else None,
                         "image": images[f"00000{i:04d}"] if ok else None, "error_stage": None if ok else "generate",
                         "error_reason": None if ok else "test_failure", "error_detail": None if ok else "failed"})
        paths += [m["path"] for m in writer(pa.Table.from_pylist(rows, schema=GENERATE_ENCODED_ROWS)).to_pylist()]
    return paths, images


def test_generated_shards_stream_part_by_part_into_a_tar_both_readers_read(tmp_path):
    """The generate job's writer streams each part into the tar (webdataset's TarWriter): members in index
    order, sorted by extension within a sample, fixed headers (mode 0444, mtime 0, no owner names); tarflow's
    img2dataset reader and webdataset read the same samples; a writer failing halfway leaves the shard's tar
    as it was and no temporary file."""
    import tarfile

    import pyarrow.parquet as pq
    import webdataset as wds

    from tarflow.data.img2dataset import read_all, resolve_inputs
    from tarflow.pipelines.generate import GenerateConfig, GeneratedShardWriter, generate_layout

    out = tmp_path / "gen"
    cfg = GenerateConfig(prompts="p.jsonl", output=str(out), mllm="m", tatok="t.pth", ar_detok="a.pth", vq="v.pt")
    spec = ShardJob(job="generate", layout=generate_layout(str(out)), facts={}, sources={},
                    writer=GeneratedShardWriter(cfg))
    paths, images = _generated_parts(tmp_path / "parts", [(3, 5), (0, 2), (3, 5)])  # out of order, replayed
    done = sharded.finalize_shard(spec, "00000", {}, paths, {"n_samples": 6})
    assert (done["counts"]["ok"], done["counts"]["failed"]) == (4, 2)
    keys = [f"00000{i:04d}" for i in (0, 1, 3, 4)]
    tar_path = out / "00000.tar"
    with tarfile.open(tar_path) as t:
        members = t.getmembers()
    assert [m.name for m in members] == [f"{k}.{e}" for k in keys for e in ("json", "png", "txt")]
    assert {(m.mode, m.mtime, m.uname, m.gname, m.uid, m.gid) for m in members} == {(0o444, 0, "", "", 0, 0)}
    [shard] = resolve_inputs(str(out))
    samples, end = read_all(shard)
    assert end.complete and [s.key for s in samples] == keys
    assert [s.image for s in samples] == [images[k] for k in keys]
    assert [s.txt.decode() for s in samples] == [f"prompt {int(k[-4:])}" for k in keys]
    read = list(wds.WebDataset(str(tar_path), shardshuffle=False))
    assert [r["__key__"] for r in read] == keys and [r["png"] for r in read] == [images[k] for k in keys]
    assert [json.loads(r["json"])["id"] for r in read] == [f"p{int(k[-4:])}" for k in keys]
    assert pq.read_table(out / "00000.parquet").column("key").to_pylist() == [f"00000{i:04d}" for i in range(6)]
    assert pq.read_table(out / "errors" / "00000.parquet").column("reason").to_pylist() == ["test_failure"] * 2
    before = tar_path.read_bytes()
    bad, _ = _generated_parts(tmp_path / "bad", [(0, 2), (3, 5)])
    broken = pa.ipc.open_stream(storage.read_bytes(bad[1])).read_all()
    broken = broken.set_column(broken.schema.get_field_index("image"), "image",
                               pa.nulls(len(broken), pa.binary()))  # ok rows without an image: TarWriter refuses
    storage.write_bytes_atomic(bad[1], sharded.finalize._ipc_bytes(broken))
    with pytest.raises(ValueError, match="bytes"):
        sharded.finalize_shard(spec, "00000", {}, bad, {"n_samples": 6})
    assert tar_path.read_bytes() == before
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_atomic_streams_to_s3_appear_whole_or_not_at_all(s3_bucket):
    """storage.open_atomic on an object store: the upload (multipart past the block size) completes when the block
    ends; a block that raises leaves no object."""
    fs, _ = storage.filesystem(s3_bucket + "/x")
    with storage.open_atomic(f"{s3_bucket}/a.bin") as f:
        for _ in range(3):
            f.write(b"x" * (3 << 20))  # 9 MiB: past s3fs' 5 MiB block, a multipart upload
    assert fs.size(f"{s3_bucket}/a.bin".removeprefix("s3://")) == 9 << 20
    for size in (1 << 10, 9 << 20):  # a single PUT that never happens; a multipart upload aborted
        with pytest.raises(RuntimeError, match="halfway"):
            with storage.open_atomic(f"{s3_bucket}/b{size}.bin") as f:
                f.write(b"y" * size)
                raise RuntimeError("halfway")
        fs.invalidate_cache()
        assert not fs.exists(f"{s3_bucket}/b{size}.bin".removeprefix("s3://"))
