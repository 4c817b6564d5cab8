"""Reading img2dataset shards and decoding samples, without Ray: every bad case gets its named reason."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pyarrow as pa
import pytest
import shardmaker

from tarflow.data import img2dataset as i2d
from tarflow.data.images import decode_rgb
from tarflow.pipelines.image_stages import ImageDecoder, ShardReader


def _shard(path) -> i2d.ShardInput:
    return i2d.resolve_inputs(str(path))[0]


def _decoded(path, **kw) -> list[dict]:
    raw = pa.concat_tables(list(ShardReader(chunk_size=4)(pa.Table.from_pylist([vars(_shard(path))]))))
    return ImageDecoder(input_size=56, **kw)(raw).to_pylist()


@pytest.fixture(scope="module")
def bad_tar(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad") / "00007.tar"
    members = [m for _, ms, _ in shardmaker.bad_samples() for m in ms]
    shardmaker.write_tar(str(path), members)
    return path


def test_every_bad_sample_gets_its_reason_and_good_ones_decode(bad_tar):
    expected = {key: outcome for key, _, outcome in shardmaker.bad_samples()}
    rows = _decoded(bad_tar, max_pixels=shardmaker.TEST_MAX_PIXELS)
    samples = [r for r in rows if r["kind"] == "sample"]
    assert [r["key"] for r in samples] == list(expected)  # tar order, every sample once
    for r in samples:
        want = expected[r["key"]]
        got = "ok" if r["ok"] else r["error_reason"]
        assert got == want, (r["key"], r["error_detail"])
        if r["ok"]:
            assert len(r["pixels"]) == 56 * 56 * 3 and r["width"] > 0 and r["height"] > 0
        else:
            assert r["error_stage"] in ("read", "decode") and r["pixels"] is None
    end = [r for r in rows if r["kind"] == "end"]
    assert len(end) == 1 and '"n_samples": %d' % len(expected) in end[0]["end_info"]


def _image_of(key_suffix_pred):
    for key, members, outcome in shardmaker.bad_samples():
        for name, data in members:
            if key_suffix_pred(key, name, data):
                return key, data
    raise LookupError


def test_sixteen_bit_png_is_scaled_not_clipped():
    _, data = _image_of(lambda k, n, d: n.endswith(".png") and _mode(d) == "I;16")
    rgb = np.asarray(decode_rgb(data))
    assert rgb.dtype == np.uint8 and rgb.std() > 5  # Pillow's plain convert would make it all white (255)
    assert rgb.max() < 255 or rgb.min() < 250


def test_cmyk_and_palette_and_alpha_convert_to_rgb():
    for mode in ("CMYK", "P", "RGBA"):
        _, data = _image_of(lambda k, n, d, m=mode: not n.endswith((".txt", ".json")) and _mode(d) == m)
        im = decode_rgb(data)
        assert im.mode == "RGB" and np.asarray(im).std() > 1, mode


def test_exif_orientation_is_ignored_by_default_and_applied_on_request():
    _, data = _image_of(lambda k, n, d: n.endswith(".jpg") and _orientation(d) == 6)
    stored = decode_rgb(data)
    upright = decode_rgb(data, exif_transpose=True)
    assert upright.size == stored.size[::-1]


def test_tar_cut_mid_member_keeps_samples_before_the_cut(tmp_path):
    images = shardmaker.sample_images()[:4]
    members = []
    for i, (name, data, cap) in enumerate(images):
        members += [(f"{i:06d}.jpg", data), (f"{i:06d}.txt", cap.encode())]
    path = tmp_path / "00000.tar"
    shardmaker.write_tar(str(path), members)
    # cut inside the third image's bytes
    with tarfile.open(path) as t:
        third = t.getmember("000002.jpg")
    with open(path, "r+b") as f:
        f.truncate(third.offset_data + third.size // 2)
    samples, end = i2d.read_all(_shard(path))
    assert [s.key for s in samples] == ["000000", "000001", "000002"]
    assert [s.error for s in samples[:2]] == [None, None]
    assert samples[2].error[1] == "truncated_tar"
    assert end.n_samples == 3 and not end.complete and "truncated" in end.detail


def test_tar_cut_at_a_member_boundary_is_incomplete(tmp_path):
    name, data, cap = shardmaker.sample_images()[0]
    path = tmp_path / "00000.tar"
    shardmaker.write_tar(str(path), [("000000.jpg", data), ("000000.txt", cap.encode()),
                                     ("000001.jpg", data)])
    with tarfile.open(path) as t:
        last = t.getmember("000000.txt")
    with open(path, "r+b") as f:
        f.truncate(last.offset_data + 512)
    samples, end = i2d.read_all(_shard(path))
    assert [s.key for s in samples] == ["000000"] and not end.complete


def test_fewer_samples_than_img2dataset_stats_is_incomplete(tmp_path):
    from tarflow.data.sample import write_img2dataset_shards

    write_img2dataset_shards(tmp_path, shardmaker.sample_images()[:3], samples_per_shard=3)
    (tmp_path / "00000_stats.json").write_text('{"successes": 5}')
    samples, end = i2d.read_all(_shard(tmp_path / "00000.tar"))
    assert len(samples) == 3 and not end.complete and "_stats.json" in end.detail


def test_duplicate_key_and_no_image(tmp_path):
    name, data, cap = shardmaker.sample_images()[0]
    path = tmp_path / "00000.tar"
    shardmaker.write_tar(str(path), [("a.jpg", data), ("b.txt", b"x"), ("a.jpg", data)])
    samples, end = i2d.read_all(_shard(path))
    assert [(s.key, s.error and s.error[1]) for s in samples] == [("a", None), ("b", "no_image"),
                                                                  ("a", "duplicate_key")]
    assert end.complete


def test_resolve_inputs_forms(tmp_path):
    from tarflow.data.sample import write_img2dataset_shards

    d = tmp_path / "laion"
    write_img2dataset_shards(d, shardmaker.sample_images(), samples_per_shard=3)  # 3 shards + parquet + stats
    names = ["00000", "00001", "00002"]
    assert [s.name for s in i2d.resolve_inputs(str(d))] == names  # the sibling .parquet are not shards
    assert all(s.format == "webdataset" and s.size > 0 for s in i2d.resolve_inputs(str(d)))
    assert [s.name for s in i2d.resolve_inputs(f"{d}/{{00000..00001}}.tar")] == names[:2]
    assert [s.name for s in i2d.resolve_inputs(f"{d}/*.tar")] == names
    assert [s.name for s in i2d.resolve_inputs(f"{d}/0000")] == names  # a key prefix
    lst = tmp_path / "shards.txt"
    lst.write_text("# my shards\nlaion/00002.tar\n" + str(d / "00000.tar") + "\n")
    assert [s.name for s in i2d.resolve_inputs(str(lst))] == ["00000", "00002"]
    with pytest.raises(i2d.InputError, match="does not exist"):
        i2d.resolve_inputs(f"{d}/{{00000..00005}}.tar")
    with pytest.raises(i2d.InputError, match="does not exist"):
        i2d.resolve_inputs(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(i2d.InputError, match="no shards found"):
        i2d.resolve_inputs(str(tmp_path / "empty"))
    other = tmp_path / "other"
    write_img2dataset_shards(other, shardmaker.sample_images()[:1], samples_per_shard=3)
    with pytest.raises(i2d.InputError, match="share the name"):
        i2d.resolve_inputs([str(d), str(other)])


def test_parquet_output_format_of_img2dataset(tmp_path):
    import pyarrow.parquet as pq

    images = shardmaker.sample_images()[:3]
    rows = [{"key": f"{i:06d}", "jpg": data, "caption": cap, "url": f"http://h/{n}", "status": "success"}
            for i, (n, data, cap) in enumerate(images)]
    rows.insert(1, {"key": "000009", "jpg": None, "caption": "x", "url": "http://h/404",
                    "status": "failed_to_download"})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "00000.parquet")
    shard = i2d.resolve_inputs(str(tmp_path), "parquet")[0]
    samples, end = i2d.read_all(shard)
    assert [s.key for s in samples] == ["000000", "000001", "000002"] and end.n_samples == 3
    assert samples[0].txt.decode() == images[0][2] and samples[0].image == images[0][1]
    with pytest.raises(i2d.InputError, match="no image column"):
        pq.write_table(pa.table({"key": ["a"]}), tmp_path / "meta.parquet")
        i2d.read_all(i2d.ShardInput(str(tmp_path / "meta.parquet"), "meta", "parquet", 1))


def _mode(data: bytes) -> str | None:
    from PIL import Image

    try:
        return Image.open(io.BytesIO(data)).mode
    except Exception:
        return None


def _orientation(data: bytes) -> int | None:
    from PIL import Image

    try:
        return Image.open(io.BytesIO(data)).getexif().get(0x0112)
    except Exception:
        return None



def test_the_tatok_trainer_reads_images_with_the_tokenize_jobs_defaults():
    """ReadSettings (what the TA-Tok trainer passes to read_and_decode) holds the tokenize job's own defaults."""
    import dataclasses

    from tarflow.pipelines.image_stages import ReadSettings
    from tarflow.pipelines.tokenize import TokenizeConfig

    job = TokenizeConfig(input="in", output="out", tatok="ta_tok.pth")
    settings = dataclasses.asdict(ReadSettings())
    assert len(settings) == 7
    assert settings == {name: getattr(job, name) for name in settings}
