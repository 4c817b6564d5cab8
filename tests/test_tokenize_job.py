"""The tokenize job end to end on Ray Data: real img2dataset shards in, code shards out, locally and on S3."""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import shardmaker
import slowstages
import torch
from conftest import reference_fixture

from tarflow.data import schema, storage
from tarflow.data.codeshard import read_code_shard
from tarflow.models.demo import ensure_random_tatok
from tarflow.models.tatok import TATok
from tarflow.pipelines.tokenize import OutputConflict, TATokEncoder, TokenizeConfig, run_tokenize

SCALES = [1, 2, 3]


@pytest.fixture(scope="module")
def tatok_path():
    return str(ensure_random_tatok())


@pytest.fixture(scope="module")
def tatok(tatok_path):
    return TATok.from_checkpoint(tatok_path)


@pytest.fixture(scope="module")
def i2d_shards(tmp_path_factory):
    """The real img2dataset's output for 8 photos + 2 dead URLs, 4 rows per shard -> 3 shards."""
    work = tmp_path_factory.mktemp("i2d")
    return shardmaker.build_with_img2dataset(str(work), shardmaker.sample_images(), number_sample_per_shard=4,
                                             extra_bad_urls=2)


def _cfg(**kw) -> TokenizeConfig:
    kw.setdefault("scales", SCALES)
    kw.setdefault("encode_batch_size", 3)
    kw.setdefault("decode_batch_size", 2)
    kw.setdefault("progress_every_s", 0)
    return TokenizeConfig(**kw)


def _tar_samples(path):
    """(key, image bytes, caption, json text) in tar order, read independently of tarflow."""
    out, cur = [], {}
    with tarfile.open(path) as t:
        for m in t.getmembers():
            key, ext = m.name.split(".", 1)
            if cur and cur["key"] != key:
                out.append(cur)
                cur = {}
            cur["key"] = key
            cur[ext] = t.extractfile(m).read()
    if cur:
        out.append(cur)
    return out


def _check_against_inputs(output, tar_path, tatok):
    from PIL import Image

    name = os.path.basename(tar_path)[:-4]
    table = read_code_shard(storage.join(output, "codes", f"{name}.parquet"))
    rows = table.to_pylist()
    expected = _tar_samples(tar_path)
    assert [r["key"] for r in rows] == [e["key"] for e in expected]  # every sample once, in tar order
    images = [Image.open(io.BytesIO(e["jpg"])) for e in expected]
    pixels = tatok.preprocess(images)
    for s in SCALES:
        want = tatok.encode(pixels, s).numpy()
        got = np.stack([np.asarray(r[schema.code_column(s)]) for r in rows])
        assert np.array_equal(got, want), f"scale {s}"
    for r, e, im in zip(rows, expected, images):
        assert r["caption"] == e["txt"].decode()
        assert r["sha256"] == hashlib.sha256(e["jpg"]).hexdigest()
        assert (r["width"], r["height"]) == im.size
        assert r["meta"] == e["json"].decode() and r["url"] == json.loads(e["json"])["url"]
    return table


def test_tokenizes_img2dataset_shards_exactly(ray_local, i2d_shards, tatok_path, tatok, tmp_path):
    out = str(tmp_path / "out")
    summary = run_tokenize(_cfg(input=i2d_shards, output=out, tatok=tatok_path))
    tars = sorted(f for f in os.listdir(i2d_shards) if f.endswith(".tar"))
    assert summary.shards_done == len(tars) == 3 and summary.samples_failed == 0
    assert summary.samples_ok == summary.samples_in == 8
    for t in tars:
        table = _check_against_inputs(out, os.path.join(i2d_shards, t), tatok)
        assert table.schema.field("tatok_s1").type.value_type == schema.code_value_type(1024)
        meta = schema.read_metadata(table.schema, t)
        assert meta["model"]["sha256"] == tatok.sha256 and meta["scales"] == SCALES
        manifest = json.loads((tmp_path / "out" / "_manifest" / t.replace(".tar", ".json")).read_text())
        assert manifest["counts"]["samples_in"] == manifest["counts"]["ok"] + manifest["counts"]["failed"]
        assert manifest["complete"] and manifest["model"]["sha256"] == tatok.sha256
        assert manifest["input"]["size"] == os.path.getsize(os.path.join(i2d_shards, t))
        assert pq.read_table(tmp_path / "out" / "errors" / t.replace(".tar", ".parquet")).num_rows == 0
    assert not [p for p in (tmp_path / "out").rglob("*") if p.name.endswith(".tmp")]


def test_s3_in_and_out_with_parquet_input_format(ray_local, tmp_path, s3_bucket, tatok_path, tatok):
    import s3fs

    work = tmp_path / "w"
    work.mkdir()
    src = shardmaker.build_with_img2dataset(str(work), shardmaker.sample_images()[:5], output_format="parquet",
                                            number_sample_per_shard=4, extra_bad_urls=1)
    fs = s3fs.S3FileSystem()
    fs.put(src + "/", f"{s3_bucket}/laion/", recursive=True)
    fs.put(tatok_path, f"{s3_bucket}/models/ta_tok.pth")
    fs.put(os.path.join(os.path.dirname(tatok_path), "encoder", "config.json"),
           f"{s3_bucket}/models/encoder/config.json")
    out = f"{s3_bucket}/laion-tatok"
    summary = run_tokenize(_cfg(input=f"{s3_bucket}/laion/", output=out, tatok=f"{s3_bucket}/models/ta_tok.pth",
                                input_format="parquet", scales=[2]))
    assert summary.shards_done == 2 and summary.samples_ok == 5 and summary.samples_failed == 0
    rows = []
    for name in ("00000", "00001"):
        rows += read_code_shard(f"{out}/codes/{name}.parquet").to_pylist()
        assert fs.exists(f"{out}/_manifest/{name}.json")
    by_name = {n: (data, cap) for n, data, cap in shardmaker.sample_images()[:5]}
    from PIL import Image

    assert sorted(r["caption"] for r in rows) == sorted(cap for _, cap in by_name.values())
    for r in rows:
        data = next(d for d, c in by_name.values() if c == r["caption"])
        want = tatok.encode(tatok.preprocess([Image.open(io.BytesIO(data))]), 2)[0].numpy()
        assert np.array_equal(np.asarray(r["tatok_s2"]), want)
    # a rerun against S3 finds the manifests and skips every shard
    again = run_tokenize(_cfg(input=f"{s3_bucket}/laion/", output=out, tatok=f"{s3_bucket}/models/ta_tok.pth",
                              input_format="parquet", scales=[2]))
    assert again.shards_skipped == 2 and again.shards_done == 0


def test_bad_input_is_recorded_and_nothing_is_lost(ray_local, tmp_path, tatok_path):
    inp = tmp_path / "in"
    inp.mkdir()
    bad = shardmaker.bad_samples()
    shardmaker.write_tar(str(inp / "00000.tar"), [m for _, ms, _ in bad for m in ms])
    # a second shard cut mid-member
    good = shardmaker.sample_images()[:4]
    shardmaker.write_tar(str(inp / "00001.tar"), [(f"{i:06d}.{ext}", payload) for i, (_, d, c) in enumerate(good)
                                                  for ext, payload in (("jpg", d), ("txt", c.encode()))])
    with tarfile.open(inp / "00001.tar") as t:
        cut = t.getmember("000002.jpg")
    with open(inp / "00001.tar", "r+b") as f:
        f.truncate(cut.offset_data + 100)
    out = tmp_path / "out"
    summary = run_tokenize(_cfg(input=str(inp), output=str(out), tatok=tatok_path, scales=[1],
                                max_pixels=shardmaker.TEST_MAX_PIXELS))
    assert summary.shards_done == 2 and summary.shards_incomplete == ["00001"]
    codes = pq.read_table(out / "codes" / "00000.parquet").to_pylist()
    errors = pq.read_table(out / "errors" / "00000.parquet").to_pylist()
    expected_ok = [k for k, _, o in bad if o == "ok"]
    assert [r["key"] for r in codes] == expected_ok
    assert {r["key"]: r["reason"] for r in errors} == {k: o for k, _, o in bad if o != "ok"}
    assert all(r["shard"] == "00000" and r["stage"] in ("read", "decode") for r in errors)
    for shard in ("00000", "00001"):
        m = json.loads((out / "_manifest" / f"{shard}.json").read_text())["counts"]
        assert m["samples_in"] == m["ok"] + m["failed"]
    m1 = json.loads((out / "_manifest" / "00001.json").read_text())
    assert not m1["complete"] and "truncated" in m1["incomplete_reason"]
    assert m1["counts"] == {"samples_in": 3, "ok": 2, "failed": 1, "failed_by_reason": {"truncated_tar": 1}}
    assert sum(summary.failed_by_reason.values()) == summary.samples_failed == len(errors) + 1


def test_rerun_skips_refuses_to_mix_and_overwrites(ray_local, i2d_shards, tatok_path, tmp_path):
    out = tmp_path / "out"
    first = run_tokenize(_cfg(input=i2d_shards, output=str(out), tatok=tatok_path, scales=[1]))
    assert first.shards_done == 3
    stamp = {p.name: p.stat().st_mtime_ns for p in (out / "codes").iterdir()}
    again = run_tokenize(_cfg(input=i2d_shards, output=str(out), tatok=tatok_path, scales=[1]))
    assert (again.shards_done, again.shards_skipped) == (0, 3)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "codes").iterdir()} == stamp
    with pytest.raises(OutputConflict, match="scales"):
        run_tokenize(_cfg(input=i2d_shards, output=str(out), tatok=tatok_path, scales=[1, 2]))
    ref = str(shardmaker_reference_checkpoint(tmp_path))
    with pytest.raises(OutputConflict, match="sha256"):
        run_tokenize(_cfg(input=i2d_shards, output=str(out), tatok=ref, scales=[1]))
    redo = run_tokenize(_cfg(input=i2d_shards, output=str(out), tatok=tatok_path, scales=[1, 2], overwrite=True))
    assert redo.shards_done == 3
    assert read_code_shard(str(out / "codes" / "00000.parquet")).column_names[-2:] == ["tatok_s1", "tatok_s2"]


def shardmaker_reference_checkpoint(tmp_path):
    """Another TA-Tok with the same shape but other weights (seed 1)."""
    from tarflow.models.tatok import random_tatok

    model, cfg = random_tatok(1, teacher="encoder")
    (tmp_path / "other" / "encoder").mkdir(parents=True)
    (tmp_path / "other" / "encoder" / "config.json").write_text(json.dumps(cfg))
    torch.save(model.checkpoint_dict(), tmp_path / "other" / "ta_tok.pth")
    return tmp_path / "other" / "ta_tok.pth"


_DRIVER = """
import sys, ray
sys.path[:0] = [{tests!r}]
from slowstages import SlowEncoder
from tarflow.pipelines.tokenize import TokenizeConfig, run_tokenize
ray.init(address={address!r}, log_to_driver=False)
run_tokenize(TokenizeConfig(input={input!r}, output={output!r}, tatok={tatok!r}, scales=[1], encode_batch_size=1,
                            decode_batch_size=1, progress_every_s=0), encoder_cls=SlowEncoder,
             encoder_kwargs={{"delay_s": 0.7}})
"""


@pytest.mark.cluster  # fault injection: run by `make test-cluster`
def test_driver_killed_midway_loses_and_duplicates_nothing(ray_local, i2d_shards, tatok_path, tmp_path):
    """The driver is SIGKILLed once a shard is finished: parts and unfinished shards are left behind. The
    rerun removes the parts, redoes exactly the unfinished shards, and the result equals a clean run."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    script = _DRIVER.format(tests=os.path.dirname(__file__), address=ray_local.get_runtime_context().gcs_address,
                            input=i2d_shards, output=str(out), tatok=tatok_path)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list((out / "_manifest").glob("*.json")):
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(p.stem for p in (out / "_manifest").glob("*.json"))
    assert 1 <= len(finished) < 3
    resumed = run_tokenize(_cfg(input=i2d_shards, output=str(out), tatok=tatok_path, scales=[1]))
    assert (resumed.shards_done, resumed.shards_skipped) == (3 - len(finished), len(finished))
    assert not (out / "_parts").exists()
    clean = tmp_path / "clean"
    run_tokenize(_cfg(input=i2d_shards, output=str(clean), tatok=tatok_path, scales=[1]))
    for name in ("00000", "00001", "00002"):
        a = read_code_shard(str(out / "codes" / f"{name}.parquet")).to_pylist()
        b = read_code_shard(str(clean / "codes" / f"{name}.parquet")).to_pylist()
        assert a == b and len({r["key"] for r in a}) == len(a)


@pytest.mark.cluster  # fault injection (a stage raising on one shard): `make test-cluster`
def test_a_shard_failing_in_a_stage_fails_alone_and_the_rerun_redoes_it(ray_local, i2d_shards, tatok_path,
                                                                        tmp_path):
    """A library error that leaves the device usable: the shard fails at once (no retry), the reason in the
    summary, the worker's traceback in the job's log file."""
    from tarflow.pipelines import runtime

    out = tmp_path / "out"
    log_file = runtime.open_job_log("test")
    summary = run_tokenize(_cfg(input=i2d_shards, output=str(out), tatok=tatok_path, scales=[1]),
                           encoder_cls=slowstages.EncoderFailingOnShard, encoder_kwargs={"bad_shard": "00001"})
    assert summary.shards_failed == ["00001"] and summary.shards_done == 2
    assert summary.failed_shard_reasons["00001"].startswith("encode_failed: encode: KeyError")
    assert "a library bug on this shard" in summary.failed_shard_reasons["00001"]
    logged = open(log_file).read()
    assert "tokenize: shard 00001 failed: encode_failed\nTraceback" in logged
    assert 'raise KeyError("a library bug on this shard (injected)")' in logged  # the worker's own frame
    assert sorted(p.stem for p in (out / "_manifest").glob("*.json")) == ["00000", "00002"]
    again = run_tokenize(_cfg(input=i2d_shards, output=str(out), tatok=tatok_path, scales=[1]))
    assert (again.shards_done, again.shards_skipped, again.shards_failed) == (1, 2, [])


@pytest.mark.cluster  # two runs, the second with 1 MB of payload per row through every stage: `make test-cluster`
def test_the_driver_receives_metadata_only_whatever_the_rows_carry(ray_local, i2d_shards, tatok_path, tmp_path):
    """Rows 100x larger (1 MB of payload each, as images would be) cost the driver the same bytes: workers
    write the shards, the driver sees paths and indices."""
    seen = {}
    for ballast in (10_000, 1_000_000):
        s = run_tokenize(_cfg(input=i2d_shards, output=str(tmp_path / f"o{ballast}"), tatok=tatok_path, scales=[1]),
                         encoder_cls=slowstages.EncoderWithBallast, encoder_kwargs={"ballast_bytes": ballast})
        assert s.shards_done == 3 and s.samples_ok == 8
        seen[ballast] = s.driver_bytes
    assert seen[1_000_000] < 20_000  # 8 rows x 1 MB = 8 MB went to the shards' files, not to the driver
    assert abs(seen[1_000_000] - seen[10_000]) < 2_000, seen


class EncoderThatDiesOnce(TATokEncoder):
    """Kills its own worker process on its first batch (once per test, marked by a file)."""

    def __init__(self, *a, marker: str, **kw):
        super().__init__(*a, **kw)
        self.marker = marker

    def __call__(self, batch):
        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        return super().__call__(batch)


@pytest.mark.cluster  # fault injection (an actor killed): `make test-cluster`
def test_encoder_actor_killed_midway_loses_and_duplicates_nothing(ray_local, i2d_shards, tatok_path, tatok,
                                                                  tmp_path):
    marker = str(tmp_path / "died")
    out = str(tmp_path / "out")
    summary = run_tokenize(_cfg(input=i2d_shards, output=out, tatok=tatok_path), encoder_cls=EncoderThatDiesOnce,
                           encoder_kwargs={"marker": marker})
    assert os.path.exists(marker)  # the actor did die
    assert summary.shards_done == 3 and summary.samples_ok == 8 and not summary.shards_failed
    for t in sorted(f for f in os.listdir(i2d_shards) if f.endswith(".tar")):
        _check_against_inputs(out, os.path.join(i2d_shards, t), tatok)


# a second tokenize path (--vq; the AR trainer's data fixture runs it in make test): `make test-cluster`
@pytest.mark.cluster
def test_vq_codes_at_the_detokenizer_resolution(ray_local, i2d_shards, tatok_path, tmp_path):
    """--vq stores the pixel-VQ codes of each image resized to --vq-resolution, exactly VQVAE.encode of the same
    preprocessing done here; the VQ facts are recorded and a rerun with another VQ setting refuses to mix."""
    from PIL import Image

    from tarflow.models.tatok import pixels_from_uint8, resize_uint8
    from tarflow.models.vqvae import VQVAE

    vq_path = str(reference_fixture("vqvae") / "vq.pt")
    vq = VQVAE.from_checkpoint(vq_path)
    out = tmp_path / "out"
    summary = run_tokenize(_cfg(input=i2d_shards, output=str(out), tatok=tatok_path, scales=[3], vq=vq_path,
                                vq_resolution=64))
    assert summary.shards_done == 3 and summary.samples_ok == 8
    for t in sorted(f for f in os.listdir(i2d_shards) if f.endswith(".tar")):
        table = read_code_shard(str(out / "codes" / t.replace(".tar", ".parquet")))  # checks the vq column
        assert table.schema.field("vq16_64").type.value_type == schema.code_value_type(64)
        images = [Image.open(io.BytesIO(e["jpg"])) for e in _tar_samples(os.path.join(i2d_shards, t))]
        want = vq.encode(pixels_from_uint8(torch.from_numpy(np.stack([resize_uint8(im, 64) for im in images]))))
        got = np.stack([np.asarray(c) for c in table.column("vq16_64").to_pylist()])
        assert got.shape == (len(images), 16) and np.array_equal(got, want.numpy())
        for facts in (json.loads((out / "_manifest" / t.replace(".tar", ".json")).read_text())["vq"],
                      schema.read_metadata(table.schema, t)["vq"]):
            assert facts["sha256"] == vq.sha256 and facts["resolution"] == 64 and facts["column"] == "vq16_64"
            assert facts["codebook_size"] == 64 and facts["num_tokens"] == 16
    with pytest.raises(OutputConflict, match="vq.resolution 64 != 32"):
        run_tokenize(_cfg(input=i2d_shards, output=str(out), tatok=tatok_path, scales=[3], vq=vq_path,
                          vq_resolution=32))
    with pytest.raises(OutputConflict, match=r"vq \{.*codebook_size.* != null"):
        run_tokenize(_cfg(input=i2d_shards, output=str(out), tatok=tatok_path, scales=[3]))
    again = run_tokenize(_cfg(input=i2d_shards, output=str(out), tatok=tatok_path, scales=[3], vq=vq_path,
                              vq_resolution=64))
    assert again.shards_skipped == 3


# a second tokenize path (--latents; the diffusion trainer's data fixture runs it in make test): `make test-cluster`
@pytest.mark.cluster
def test_latents_at_the_latent_resolution(ray_local, i2d_shards, tatok_path, tmp_path):
    """--latents stores the DC-AE latents of each image resized to --latent-resolution (float16, unscaled), those of
    AutoencoderDC.encode on the same preprocessing done here; the VAE is named by the content of its own folder
    (a SANA pipeline folder's vae/, never its text encoder), so the same VAE elsewhere resumes and another
    conflicts, as for --vq."""
    pytest.importorskip("diffusers")
    import shutil

    import tinysana
    from PIL import Image

    from tarflow.models.diffusion_detok import encode_latents, load_vae
    from tarflow.models.tatok import resize_uint8

    pipe = tinysana.save_tiny_sana(tmp_path / "Tiny-SANA", caption_channels=36, sample_size=8)
    (pipe / "text_encoder").mkdir()
    (pipe / "text_encoder" / "model.safetensors").write_text("Gemma: not a VAE, never hashed or loaded")
    vae = load_vae(str(pipe))
    out = tmp_path / "out"
    summary = run_tokenize(_cfg(input=i2d_shards, output=str(out), tatok=tatok_path, scales=[3], latents=str(pipe),
                                latent_resolution=32))
    assert summary.shards_done == 3 and summary.samples_ok == 8
    for t in sorted(f for f in os.listdir(i2d_shards) if f.endswith(".tar")):
        table = read_code_shard(str(out / "codes" / t.replace(".tar", ".parquet")))  # checks the latents column
        assert table.schema.field("latents_32").type == schema.latents_type((4, 8, 8))
        images = [Image.open(io.BytesIO(e["jpg"])) for e in _tar_samples(os.path.join(i2d_shards, t))]
        want = encode_latents(vae, torch.from_numpy(np.stack([resize_uint8(im, 32) for im in images]))).numpy()
        got = np.stack(table.column("latents_32").to_numpy(zero_copy_only=False)).reshape(len(images), 4, 8, 8)
        assert got.dtype == np.float16 and want.std() > 0.05  # the images' latents, not zeros
        np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=2e-3)  # float16 rounding
        for facts in (json.loads((out / "_manifest" / t.replace(".tar", ".json")).read_text())["latents"],
                      schema.read_metadata(table.schema, t)["latents"]):
            assert facts["shape"] == [4, 8, 8] and facts["column"] == "latents_32" and facts["resolution"] == 32
            assert facts["scaling_factor"] == pytest.approx(tinysana.SCALING_FACTOR)
            assert facts["version"] == schema.LATENTS_VERSION and facts["class"] == "AutoencoderDC"
    # the same VAE copied elsewhere, given as its own folder: the same facts, nothing redone
    shutil.copytree(pipe / "vae", tmp_path / "dcae")
    again = run_tokenize(_cfg(input=i2d_shards, output=str(out), tatok=tatok_path, scales=[3],
                              latents=str(tmp_path / "dcae"), latent_resolution=32))
    assert again.shards_skipped == 3
    tinysana.save_tiny_vae(tmp_path / "other-vae", seed=1)
    with pytest.raises(OutputConflict, match=r'latents.sha256 "[0-9a-f]+\.\.\. != "[0-9a-f]+'):
        run_tokenize(_cfg(input=i2d_shards, output=str(out), tatok=tatok_path, scales=[3],
                          latents=str(tmp_path / "other-vae"), latent_resolution=32))
    with pytest.raises(OutputConflict, match=r"latents \{.*AutoencoderDC.* != null"):
        run_tokenize(_cfg(input=i2d_shards, output=str(out), tatok=tatok_path, scales=[3]))
    with pytest.raises(ValueError, match="--latent-resolution 30 is not a positive multiple of the VAE's downsample "
                                         "factor 4"):
        run_tokenize(_cfg(input=i2d_shards, output=str(out), tatok=tatok_path, scales=[3], latents=str(pipe),
                          latent_resolution=30))


def test_latents_problems_are_one_line_each_before_ray_starts(tmp_path, capsys, monkeypatch):
    """--latents that is no VAE folder, a VAE without weights, a resolution the VAE cannot take: every problem on
    its own line naming the path and the fix, exit 2, Ray never started."""
    pytest.importorskip("diffusers")
    import importlib.util

    import tinysana

    import tarflow.pipelines.runtime

    def no_ray(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(tarflow.pipelines.runtime, "init_ray", no_ray)
    spec = importlib.util.spec_from_file_location("tokenize_laion", os.path.join(
        os.path.dirname(__file__), "..", "jobs", "tokenize_laion.py"))
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert job.main(["--output", str(tmp_path / "o"), "--latents", str(tmp_path / "nowhere")]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert len(err) == 1 and "--latents" in err[0] and "no AutoencoderDC config.json" in err[0], err
    vae = tinysana.save_tiny_vae(tmp_path / "dcae")
    assert job.main(["--output", str(tmp_path / "o"), "--latents", str(vae), "--latent-resolution", "30"]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert len(err) == 1 and "--latent-resolution 30" in err[0] and "downsample factor 4" in err[0], err
    for f in vae.glob("*.safetensors"):
        f.unlink()
    assert job.main(["--output", str(tmp_path / "o"), "--latents", str(vae)]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert len(err) == 1 and "has no *.safetensors weights" in err[0], err


def test_job_script_help_and_default_run(ray_local, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("tokenize_laion", os.path.join(
        os.path.dirname(__file__), "..", "jobs", "tokenize_laion.py"))
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    with pytest.raises(SystemExit) as e:
        job.parse_args(["--help"])
    assert e.value.code == 0 and "--scales" in capsys.readouterr().out
    assert job.parse_args(["--vq", "vq.pt", "--vq-resolution", "64"]).vq_resolution == 64
    assert job.parse_args(["--latents", "dcae"]).latent_resolution == 512
    with pytest.raises(SystemExit):
        job.parse_args(["--scales", "one"])
    rc = job.main(["--output", str(tmp_path / "out"), "--no-progress", "--summary-json", str(tmp_path / "s.json")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "samples: 8 in = 8 ok + 0 failed" in printed and str(tmp_path / "out") in printed
    assert json.loads((tmp_path / "s.json").read_text())["samples_ok"] == 8
    assert job.main(["--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o2")]) == 2
