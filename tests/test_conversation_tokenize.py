"""The tokenize job on LLaVA-style conversation tables (Tar's own corpora): Parquet with Hugging Face Image
structs (a downloaded dataset's data/ folder), JSON Lines with image paths under --image-root, on S3 too.
Tables are made here; codes are checked against the TA-Tok's own encoding of each image."""
from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import shardmaker
from test_tokenize_job import tatok, tatok_path  # noqa: F401  (fixtures: the demo TA-Tok, its path)

from tarflow.data import conversations, schema, storage
from tarflow.data.codeshard import read_conversation_shard
from tarflow.data.img2dataset import ShardEnd, ShardInput
from tarflow.pipelines.tokenize import OutputConflict, TokenizeConfig, run_tokenize

SCALES = [1, 3]
TURN = pa.struct([pa.field("from", pa.string()), pa.field("value", pa.string())])
HF_IMAGE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])


@pytest.fixture(scope="module")
def photos():
    return [data for _, data, _ in shardmaker.sample_images()]


def _conv(*turns):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(turns)]


# (image list or None, conversations, extra `score`, expected reason or "ok"); photo indices into `photos`
def _multi_rows(photos):
    corrupt = photos[0][: len(photos[0]) // 3]
    return [
        ([0], _conv("<image>\nWhat is this?", "An astronaut."), 0.5, "ok"),
        ([1, 2], _conv("<image>\nMake it look like <image>", "Done."), 1.5, "ok"),  # two images read
        (None, _conv("Say hi.", "Hi!"), None, "ok"),  # text only
        ([3], _conv("<image> and <image>?", "Two?"), 2.0, "image_count_mismatch"),
        ([corrupt], _conv("<image>\nDescribe.", "Noise."), 3.0, "corrupt_image"),
        ([4], [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": None}], 4.0, "bad_conversations"),
        ([5], _conv("Draw a horse.", "<image>"), 5.0, "ok"),  # an image the model writes (T2I)
    ]


def _hf_folder(root, photos) -> str:
    """A downloaded Hugging Face dataset: README.md, data/train-0000{0,1}-of-00002.parquet. File 0 holds a
    list of Image structs per row in row groups of 2 rows; file 1 one Image struct per row."""
    data = root / "data"
    data.mkdir(parents=True)
    (root / "README.md").write_text("---\ndataset_info: ...\n---\n")
    rows = _multi_rows(photos)

    def image(i):
        return {"bytes": i, "path": None} if isinstance(i, bytes) else {"bytes": photos[i], "path": f"img{i}.jpg"}

    t0 = pa.table({
        "id": [f"r{k}" for k in range(len(rows))],
        "image": pa.array([None if ims is None else [image(i) for i in ims] for ims, _, _, _ in rows],
                          pa.list_(HF_IMAGE)),
        "conversations": pa.array([c for _, c, _, _ in rows], pa.list_(TURN)),
        "score": pa.array([s for _, _, s, _ in rows], pa.float32()),
    })
    pq.write_table(t0, data / "train-00000-of-00002.parquet", row_group_size=2)
    t1 = pa.table({
        "id": ["s0", "s1"],
        "conversations": pa.array([_conv("<image>\nCaption?", "Coins."), _conv("Hello", "Hi")], pa.list_(TURN)),
        "image": pa.array([image(6), None], HF_IMAGE),
        "meta": pa.array([{"source": "x", "n": 1}, {"source": "y", "n": 2}]),
    })
    pq.write_table(t1, data / "train-00001-of-00002.parquet")
    return str(root)


JSONL_EXPECTED = ["ok", "ok", "ok", "missing_image", "invalid_json"]


def _jsonl(folder, photos, name="llava.jsonl") -> tuple[str, str]:
    """A LLaVA JSON Lines file with image paths relative to an image folder; returns (file, image root)."""
    images = folder / "images" / "coco"
    images.mkdir(parents=True)
    for i in (0, 7):
        (images / f"{i}.jpg").write_bytes(photos[i])
    lines = [
        json.dumps({"id": "j0", "image": "coco/0.jpg", "conversations": _conv("<image>\nWhat?", "Astronaut.")}),
        json.dumps({"id": "j1", "image": ["coco/0.jpg", "coco/7.jpg"],
                    "conversations": _conv("<image><image> compare", "Same?")}),
        "",
        json.dumps({"id": "j2", "conversations": _conv("Text only", "Yes"), "lang": "en"}),
        json.dumps({"id": "j3", "image": "coco/missing.jpg", "conversations": _conv("<image>", "?")}),
        '{"id": "j4", "conversations": [',
    ]
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return str(path), str(folder / "images")


def _cfg(**kw) -> TokenizeConfig:
    kw.setdefault("scales", SCALES)
    kw.setdefault("encode_batch_size", 3)
    kw.setdefault("decode_batch_size", 2)
    kw.setdefault("read_chunk", 3)
    kw.setdefault("progress_every_s", 0)
    return TokenizeConfig(**kw)


def _expected_codes(tatok, images: list[bytes]) -> dict[int, list]:
    from PIL import Image

    if not images:
        return {s: [] for s in SCALES}
    pixels = tatok.preprocess([Image.open(io.BytesIO(b)) for b in images])
    return {s: tatok.encode(pixels, s).numpy().tolist() for s in SCALES}


def _errors(out, shard) -> dict:
    return {r["key"]: r["reason"] for r in pq.read_table(os.path.join(out, "errors", f"{shard}.parquet")).to_pylist()}


def test_tokenizes_a_hugging_face_folder_and_a_jsonl_exactly(ray_local, tmp_path, photos, tatok_path, tatok):
    hf = _hf_folder(tmp_path / "LLaVA-Tiny", photos)
    jsonl, image_root = _jsonl(tmp_path / "json", photos)
    out = str(tmp_path / "out")
    summary = run_tokenize(_cfg(input=[hf, jsonl], output=out, tatok=tatok_path, image_root=image_root))
    assert summary.shards_done == 3 and not summary.shards_failed
    rows0 = _multi_rows(photos)
    assert summary.samples_in == len(rows0) + 2 + len(JSONL_EXPECTED)
    assert summary.samples_failed == 3 + 2
    assert dict(summary.failed_by_reason) == {"image_count_mismatch": 1, "corrupt_image": 1, "bad_conversations": 1,
                                              "missing_image": 1, "invalid_json": 1}
    assert summary.extra["images"] == 1 + 2 + 1 + 1 + 1 + 2  # the images of the rows written

    # file 0: passthrough columns with their input types; codes per image in order; errors with reasons
    src = pq.read_table(os.path.join(hf, "data", "train-00000-of-00002.parquet"))
    t = read_conversation_shard(os.path.join(out, "codes", "train-00000-of-00002.parquet"))
    meta = schema.check_any_code_shard(t.schema, "t")
    assert meta["format"] == schema.CONVERSATION_SHARD_FORMAT and meta["scales"] == SCALES
    assert meta["model"]["sha256"] == tatok.sha256
    for name in ("id", "conversations", "score"):
        assert t.schema.field(name).type == src.schema.field(name).type
    assert "image" not in t.column_names
    ok = [k for k, r in enumerate(rows0) if r[3] == "ok"]
    got = t.to_pylist()
    assert [r["key"] for r in got] == [f"{k:09d}" for k in ok]
    for r, k in zip(got, ok):
        want = src.slice(k, 1).to_pylist()[0]
        assert (r["id"], r["conversations"], r["score"]) == (want["id"], want["conversations"], want["score"])
        images = [im["bytes"] for im in want["image"] or []]
        assert r["num_images"] == len(images) == sum(v["value"].count("<image>") for v in r["conversations"])
        assert r["image_sha256"] == [hashlib.sha256(b).hexdigest() for b in images]
        assert r["image_path"] == [im["path"] for im in want["image"] or []]
        from PIL import Image
        assert [(w, h) for w, h in zip(r["image_width"], r["image_height"])] == [
            Image.open(io.BytesIO(b)).size for b in images]
        codes = _expected_codes(tatok, images)
        for s in SCALES:
            assert r[f"tatok_s{s}"] == codes[s], (k, s)
    assert t.schema.field("tatok_s1").type == pa.list_(pa.list_(schema.code_value_type(tatok.codebook_size)))
    assert _errors(out, "train-00000-of-00002") == {f"{k:09d}": r[3] for k, r in enumerate(rows0) if r[3] != "ok"}
    manifest = json.loads(open(os.path.join(out, "_manifest", "train-00000-of-00002.json")).read())
    assert manifest["counts"] == {"samples_in": 7, "ok": 4, "failed": 3, "failed_by_reason": {
        "image_count_mismatch": 1, "corrupt_image": 1, "bad_conversations": 1}}
    assert manifest["conversations"]["format"] == schema.CONVERSATION_SHARD_FORMAT
    assert manifest["schema"]["conversation_shard"] == schema.CONVERSATION_SHARD_VERSION
    assert "passthrough_schema" not in json.dumps(manifest)

    # file 1: a single Image struct per row, a struct column passed through
    t1 = read_conversation_shard(os.path.join(out, "codes", "train-00001-of-00002.parquet"))
    src1 = pq.read_table(os.path.join(hf, "data", "train-00001-of-00002.parquet"))
    assert t1.schema.field("meta").type == src1.schema.field("meta").type
    assert t1.column("meta").to_pylist() == src1.column("meta").to_pylist()
    assert t1.column("num_images").to_pylist() == [1, 0] and t1.column("tatok_s3").to_pylist()[1] == []
    assert t1.column("tatok_s3").to_pylist()[0] == _expected_codes(tatok, [photos[6]])[3]

    # the JSONL: keys as string columns (other values as their JSON text), paths under --image-root
    tj = read_conversation_shard(os.path.join(out, "codes", "llava.parquet"))
    assert tj.schema.field("conversations").type == pa.string() and tj.schema.field("lang").type == pa.string()
    got = tj.to_pylist()
    assert [r["id"] for r in got] == ["j0", "j1", "j2"] and [r["key"] for r in got] == [f"{k:09d}" for k in range(3)]
    assert json.loads(got[1]["conversations"]) == _conv("<image><image> compare", "Same?")
    assert [r["lang"] for r in got] == [None, None, "en"]
    assert got[1]["image_path"] == ["coco/0.jpg", "coco/7.jpg"]
    assert got[1]["tatok_s1"] == _expected_codes(tatok, [photos[0], photos[7]])[1]
    assert _errors(out, "llava") == {"000000003": "missing_image", "000000004": "invalid_json"}

    # a rerun skips every shard; img2dataset input of the same shard name, other scales conflict; --overwrite
    # redoes them
    again = run_tokenize(_cfg(input=[hf, jsonl], output=out, tatok=tatok_path, image_root=image_root))
    assert (again.shards_done, again.shards_skipped) == (0, 3)
    i2d = tmp_path / "i2d"
    i2d.mkdir()
    shardmaker.write_tar(str(i2d / "llava.tar"), [("a.jpg", photos[0]), ("a.txt", b"an astronaut")])
    with pytest.raises(OutputConflict, match="conversations"):
        run_tokenize(_cfg(input=str(i2d), output=out, tatok=tatok_path))
    with pytest.raises(OutputConflict, match="scales"):
        run_tokenize(_cfg(input=[hf], output=out, tatok=tatok_path, scales=[2]))
    redo = run_tokenize(_cfg(input=[hf], output=out, tatok=tatok_path, scales=[2], overwrite=True))
    assert redo.shards_done == 2
    assert read_conversation_shard(os.path.join(out, "codes", "train-00001-of-00002.parquet")).column_names[-1] == \
        "tatok_s2"


def test_img2dataset_output_refuses_a_conversation_table_of_the_same_name(ray_local, tmp_path, photos,
                                                                          tatok_path):
    """The other direction of the conflict above (the facts say which kind made a shard); --vq with
    conversation tables is refused; a job mixing both kinds is refused."""
    jsonl, root = _jsonl(tmp_path / "c", photos, name="00000.jsonl")
    i2d = tmp_path / "i2d"
    i2d.mkdir()
    shardmaker.write_tar(str(i2d / "00000.tar"), [("a.jpg", photos[0]), ("a.txt", b"an astronaut")])
    (tmp_path / "x").mkdir()
    shardmaker.write_tar(str(tmp_path / "x" / "00001.tar"), [("a.jpg", photos[0]), ("a.txt", b"an astronaut")])
    out = str(tmp_path / "out")
    assert run_tokenize(_cfg(input=str(i2d), output=out, tatok=tatok_path)).samples_ok == 1
    with pytest.raises(OutputConflict, match=r"conversations null != \{"):
        run_tokenize(_cfg(input=jsonl, output=out, tatok=tatok_path, image_root=root))
    from tarflow.data.img2dataset import InputError

    with pytest.raises(InputError, match="--vq with conversation tables"):
        run_tokenize(_cfg(input=jsonl, output=str(tmp_path / "o3"), tatok=tatok_path, image_root=root, vq="vq.pt"))
    with pytest.raises(InputError, match="mixes conversation tables"):
        run_tokenize(_cfg(input=[jsonl, str(tmp_path / "x" / "00001.tar")], output=str(tmp_path / "o3"),
                          tatok=tatok_path))


def test_s3_jsonl_with_images_on_s3(ray_local, tmp_path, s3_bucket, photos, tatok_path, tatok):
    import s3fs

    jsonl, root = _jsonl(tmp_path / "j", photos)
    fs = s3fs.S3FileSystem()
    fs.put(jsonl, f"{s3_bucket}/conv/llava.jsonl")
    fs.put(root + "/", f"{s3_bucket}/images/", recursive=True)
    out = f"{s3_bucket}/tok"
    summary = run_tokenize(_cfg(input=f"{s3_bucket}/conv/", output=out, tatok=tatok_path,
                                image_root=f"{s3_bucket}/images"))
    assert summary.shards_done == 1 and summary.samples_ok == 3
    assert dict(summary.failed_by_reason) == {"missing_image": 1, "invalid_json": 1}
    t = read_conversation_shard(f"{out}/codes/llava.parquet")
    assert t.column("tatok_s3").to_pylist()[0] == _expected_codes(tatok, [photos[0]])[3]
    assert fs.exists(f"{out}/_manifest/llava.json")
    again = run_tokenize(_cfg(input=f"{s3_bucket}/conv/", output=out, tatok=tatok_path,
                              image_root=f"{s3_bucket}/images"))
    assert again.shards_skipped == 1 and again.shards_done == 0


# ----------------------------------------------------------------------------------------------------------
# The reader alone (no Ray)


def _rows(path, **kw):
    items = list(conversations.iter_conversation_rows(
        ShardInput(path=str(path), name="x", format="conversations", size=os.path.getsize(path)), **kw))
    assert isinstance(items[-1], ShardEnd)
    return items[:-1], items[-1]


def test_parquet_is_read_a_row_group_at_a_time(tmp_path, monkeypatch):
    """8 row groups of 2 rows, each row 200 KB of image bytes: the first row arrives after reading about one
    row group of the 3.2 MB file, not the whole of it."""
    from tarflow.data import img2dataset

    rng = np.random.default_rng(0)
    blobs = [rng.integers(0, 255, 200_000, dtype=np.uint8).tobytes() for _ in range(16)]
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"image": pa.array([{"bytes": b, "path": None} for b in blobs], HF_IMAGE),
                             "conversations": pa.array([_conv("<image>", "x")] * 16, pa.list_(TURN))}),
                   path, row_group_size=2, compression="none")
    assert pq.ParquetFile(path).num_row_groups == 8
    read = [0]
    real = img2dataset.RetryingFile.read

    def counting(self, n=-1):
        data = real(self, n)
        read[0] += len(data)
        return data

    monkeypatch.setattr(img2dataset.RetryingFile, "read", counting)
    monkeypatch.setattr(conversations, "PARQUET_BUFFER_BYTES", 64 << 10)  # 8 MiB in a job: smaller than this file
    it = conversations.iter_conversation_rows(ShardInput(str(path), "big", "conversations", os.path.getsize(path)))
    first = next(it)
    assert first.images == [blobs[0]]
    size = os.path.getsize(path)
    assert read[0] < size / 3, (read[0], size)
    rest = list(it)
    assert [r.images[0] for r in [first] + rest[:-1]] == blobs and rest[-1].n_samples == 16


def test_json_arrays_stream_element_by_element(tmp_path, photos, monkeypatch):
    """A JSON array (LLaVA's own .json form) gives the same rows as the same rows in JSON Lines, with a read
    block of a few bytes (elements span many blocks); a malformed element fails the file."""
    jsonl, root = _jsonl(tmp_path, photos)
    good = [json.loads(x) for x in open(jsonl).read().splitlines()[:5] if x]
    arr = tmp_path / "llava.json"
    arr.write_text("\ufeff [\n" + ",\n".join(json.dumps(r, indent=1) for r in good) + "\n]\n")
    monkeypatch.setattr(conversations, "JSON_BLOCK", 7)
    a, end_a = _rows(arr, image_root=root)
    b, _ = _rows(jsonl, image_root=root)
    assert len(a) == 4 and [r.error for r in a] == [r.error for r in b[:4]]
    assert [r.images for r in a] == [r.images for r in b[:4]] and [r.passthrough for r in a][:3] == \
        [r.passthrough for r in b][:3]
    assert a[1].images == [photos[0], photos[7]]
    assert conversations.decode_schema(end_a.extra["passthrough_schema"]).names == ["id", "conversations", "lang"]
    arr.write_text('[{"id": 1, "conversations": []}, {"id": 2, oops}]')
    with pytest.raises(conversations.ShardReadError, match="corrupt_json"):
        _rows(arr)


def test_row_problems_are_named(tmp_path):
    assert conversations.count_image_marks(json.dumps(_conv("<image>", "<image> again"))) == 2
    for bad in (None, [], "not json", [{"from": "human"}], [{"value": "x"}], ["turn"]):
        with pytest.raises(conversations.RowError, match="") as e:
            conversations.count_image_marks(bad)
        assert e.value.reason == "bad_conversations"
    assert conversations.image_refs([{"bytes": b"x", "path": "p"}, "q.jpg", b"y"]) == [
        (b"x", "p"), (None, "q.jpg"), (b"y", None)]
    with pytest.raises(conversations.RowError, match="relative path"):
        conversations.resolve_image_path("a.jpg", None)


# ----------------------------------------------------------------------------------------------------------
# Checks before Ray starts


def _job():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tokenize_laion", os.path.join(
        os.path.dirname(__file__), "..", "jobs", "tokenize_laion.py"))
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


def test_conversation_input_problems_are_one_line_each_before_ray_starts(tmp_path, photos, capsys, monkeypatch):
    import tarflow.pipelines.runtime

    def no_ray(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(tarflow.pipelines.runtime, "init_ray", no_ray)
    job = _job()
    jsonl, root = _jsonl(tmp_path / "j", photos)

    def errors(*argv):
        assert job.main(["--output", str(tmp_path / "o"), *argv]) == 2
        return [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]

    err = errors("--input", jsonl)
    assert len(err) == 1 and "relative paths (e.g. 'coco/0.jpg')" in err[0] and "--image-root" in err[0], err
    err = errors("--input", jsonl, "--image-root", str(tmp_path / "nowhere"))
    assert len(err) == 1 and "--image-root" in err[0] and "not a folder" in err[0], err
    err = errors("--input", jsonl, "--image-root", root, "--vq", "vq.pt")
    assert len(err) == 1 and err[0].startswith("error: --vq vq.pt: is for image-text pairs"), err
    neither = tmp_path / "neither.parquet"
    pq.write_table(pa.table({"id": ["a"], "text": ["b"]}), neither)
    err = errors("--input", str(neither))
    assert len(err) == 1 and "neither img2dataset's parquet output" in err[0], err
    err = errors("--input", str(neither), "--input-format", "conversations")
    assert len(err) == 1 and "no `conversations` column" in err[0], err
    clash = tmp_path / "clash.parquet"
    pq.write_table(pa.table({"key": ["a"], "conversations": ["[]"]}), clash)
    err = errors("--input", str(clash))
    assert len(err) == 1 and "clash" in err[0] and "rename" in err[0], err
