"""The caption and generate jobs end to end on Ray Data, with a tiny Tar MLLM and the reference fixtures."""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import reference_fixture

from tarflow.data import schema
from tarflow.data.codeshard import read_code_shard
from tarflow.pipelines.sharded import OutputConflict


@pytest.fixture(scope="module")
def tar_folder(tmp_path_factory):
    import tiny_tar

    return tiny_tar.save_tiny_tar(tmp_path_factory.mktemp("tar") / "tiny-tar", hidden=16, heads=2, kv_heads=1)


@pytest.fixture(scope="module")
def tar(tar_folder):
    from tarflow.models.mllm import load_tar

    return load_tar(tar_folder)


@pytest.fixture(scope="module")
def code_shards(ray_local, tmp_path_factory):
    """The tokenize job's output for the bundled sample, with the reference TA-Tok (81 codes at scale 1)."""
    from tarflow.data.sample import ensure_sample_shards
    from tarflow.pipelines.tokenize import TokenizeConfig, run_tokenize

    out = tmp_path_factory.mktemp("tok") / "out"
    run_tokenize(TokenizeConfig(input=str(ensure_sample_shards()), output=str(out),
                                tatok=str(reference_fixture("ta_tok") / "ta_tok.pth"), scales=[1, 3],
                                progress_every_s=0))
    return out


# -- caption -------------------------------------------------------------------------------------------------


def test_captions_equal_hf_generate_per_image_and_resume(ray_local, code_shards, tar_folder, tar, tmp_path):
    from tarflow.models.mllm import i2t_prompt_ids
    from tarflow.pipelines.caption import CaptionConfig, run_caption

    model, tokenizer, vocab = tar
    out = tmp_path / "captions"
    cfg = CaptionConfig(input=str(code_shards), output=str(out), model=tar_folder, max_new_tokens=6, batch_size=3,
                        progress_every_s=0)
    summary = run_caption(cfg)
    assert summary.shards_done == 2 and summary.samples_ok == 8 and summary.samples_failed == 0
    for shard in ("00000", "00001"):
        codes = read_code_shard(str(code_shards / "codes" / f"{shard}.parquet")).to_pylist()
        table = pq.read_table(out / "captions" / f"{shard}.parquet")
        assert schema.read_metadata(table.schema, shard)["format"] == schema.CAPTIONS_FORMAT
        rows = table.to_pylist()
        assert [r["key"] for r in rows] == [c["key"] for c in codes]
        for r, c in zip(rows[:2], codes[:2]):
            ids = i2t_prompt_ids(tokenizer, vocab, c["tatok_s1"], r["prompt"])
            ref = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                                 eos_token_id=vocab.eos_id, pad_token_id=vocab.pad_id)[0, len(ids):].tolist()
            ref = ref[:ref.index(vocab.eos_id)] if vocab.eos_id in ref else ref
            assert r["caption"] == tokenizer.decode(ref, skip_special_tokens=True).strip()
            assert (r["prompt_tokens"], r["caption_tokens"]) == (len(ids), len(ref))
            assert r["model"] == tar_folder and json.loads(r["sampling"])["greedy"] is True
        manifest = json.loads((out / "_manifest" / f"{shard}.json").read_text())
        assert manifest["counts"]["samples_in"] == manifest["counts"]["ok"] == len(codes)
    again = run_caption(cfg)
    assert (again.shards_done, again.shards_skipped) == (0, 2)
    with pytest.raises(OutputConflict, match="question"):
        run_caption(CaptionConfig(input=str(code_shards), output=str(out), model=tar_folder, question="Why?"))


@pytest.mark.cluster  # a second caption run (another scale, bad codes): `make test-cluster`
def test_caption_reads_another_scale_and_records_bad_codes(ray_local, code_shards, tar_folder, tmp_path):
    from tarflow.pipelines.caption import CaptionConfig, run_caption

    # a code shard with one row whose codes are not a square grid
    src = read_code_shard(str(code_shards / "codes" / "00000.parquet"))
    rows = src.to_pylist()
    rows[1]["tatok_s3"] = rows[1]["tatok_s3"][:-1]
    (tmp_path / "codes").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=src.schema), tmp_path / "codes" / "bad.parquet")
    out = tmp_path / "out"
    summary = run_caption(CaptionConfig(input=str(tmp_path / "codes"), output=str(out), model=tar_folder, scale=3,
                                        max_new_tokens=3, progress_every_s=0))
    assert (summary.samples_in, summary.samples_ok, summary.samples_failed) == (4, 3, 1)
    errors = pq.read_table(out / "errors" / "bad.parquet").to_pylist()
    assert [(e["key"], e["reason"]) for e in errors] == [(rows[1]["key"], "bad_codes")]
    # a shard without the asked scale fails alone, with the reason, and gets no manifest
    other = run_caption(CaptionConfig(input=str(tmp_path / "codes"), output=str(tmp_path / "o2"), model=tar_folder,
                                      scale=2))
    assert other.shards_failed == ["bad"] and "tatok_s2" in other.failed_shard_reasons["bad"]
    assert not (tmp_path / "o2" / "_manifest" / "bad.json").exists()


# -- generate ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompt_table(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    rows = [{"id": "cat", "prompt": "A photo of a cat.", "n": 2, "seed": 7},
            {"id": "empty", "prompt": "  "},
            {"id": "dog", "prompt": "A dog on a beach.", "scale": 3},
            {"id": "weird", "prompt": "A red cube.", "scale": 7},
            {"id": "bird", "prompt": "A bird.", "scale": 2}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _gen_cfg(prompt_table, tar_folder, output, **kw):
    from tarflow.pipelines.generate import GenerateConfig

    ref = reference_fixture("ta_tok").parent
    return GenerateConfig(prompts=str(prompt_table), output=str(output), mllm=tar_folder,
                          tatok=str(ref / "ta_tok" / "ta_tok.pth"), ar_detok=str(ref / "ar_dtok" / "ar_dtok.pth"),
                          vq=str(ref / "vqvae" / "vq.pt"), samples_per_shard=3, progress_every_s=0, **kw)


def test_generate_writes_img2dataset_shards_that_feed_back_into_tarflow(ray_local, prompt_table, tar_folder,
                                                                        tmp_path):
    from PIL import Image

    from tarflow.data.img2dataset import read_all, resolve_inputs
    from tarflow.pipelines.generate import run_generate

    out = tmp_path / "gen"
    summary = run_generate(_gen_cfg(prompt_table, tar_folder, out, batch_size=2))
    # 5 rows -> cat x2, empty (error), dog, weird (error), bird = 6 requests -> 2 shards of 3
    assert (summary.shards_done, summary.samples_in, summary.samples_ok, summary.samples_failed) == (2, 6, 4, 2)
    assert dict(summary.failed_by_reason) == {"empty_prompt": 1, "bad_scale": 1}
    for f in ("00000.tar", "00000.parquet", "00000_stats.json", "00001.tar", "_manifest/00001.json"):
        assert (out / f).exists(), f
    samples = []
    for shard in resolve_inputs(str(out)):  # the output is img2dataset layout: tarflow reads it as input
        got, end = read_all(shard)
        assert end.complete
        samples += got
    assert len(samples) == 4
    by_id = {}
    for s in samples:
        meta = json.loads(s.json)
        by_id.setdefault(meta["id"], []).append(meta)
        im = Image.open(io.BytesIO(s.image))
        assert im.format == "PNG" and im.size == (64, 64) and s.txt.decode() == meta["prompt"]
        assert len(meta["codes"]) == {1: 81, 2: 16, 3: 9}[meta["scale"]] and max(meta["codes"]) < 512
        assert meta["codes_fix"] == "ok" and meta["status"] == "success"
    assert [m["seed"] for m in by_id["cat"]] == [7, 8] and by_id["dog"][0]["scale"] == 3
    errors = pq.read_table(out / "errors" / "00000.parquet").to_pylist()
    assert [e["reason"] for e in errors] == ["empty_prompt"]
    stats = json.loads((out / "00000_stats.json").read_text())
    assert stats["successes"] == 2 and stats["count"] == 3
    again = run_generate(_gen_cfg(prompt_table, tar_folder, out, batch_size=2))
    assert (again.shards_done, again.shards_skipped) == (0, 2)
    with pytest.raises(OutputConflict, match="sampling"):
        run_generate(_gen_cfg(prompt_table, tar_folder, out, top_p=0.5))


def _images(tar_path):
    import tarfile

    from PIL import Image

    with tarfile.open(tar_path) as t:
        return {n: np.asarray(Image.open(io.BytesIO(t.extractfile(n).read()))).astype(int)
                for n in t.getnames() if n.endswith(".png")}


@pytest.mark.cluster  # minutes on 2 cores: the heavier group (make test-cluster)
def test_generated_images_are_deterministic_per_seed_whatever_the_batch(ray_local, prompt_table, tar_folder,
                                                                         tmp_path):
    from tarflow.pipelines.generate import run_generate

    run_generate(_gen_cfg(prompt_table, tar_folder, tmp_path / "a", batch_size=4))
    run_generate(_gen_cfg(prompt_table, tar_folder, tmp_path / "a2", batch_size=4))
    run_generate(_gen_cfg(prompt_table, tar_folder, tmp_path / "b", batch_size=1))
    for name in ("00000", "00001"):
        assert (tmp_path / "a" / f"{name}.tar").read_bytes() == (tmp_path / "a2" / f"{name}.tar").read_bytes()
        a = pq.read_table(tmp_path / "a" / f"{name}.parquet").to_pylist()
        b = pq.read_table(tmp_path / "b" / f"{name}.parquet").to_pylist()
        assert [r["codes"] for r in a] == [r["codes"] for r in b]  # sampling depends on the seed only
        ia, ib = _images(tmp_path / "a" / f"{name}.tar"), _images(tmp_path / "b" / f"{name}.tar")
        assert ia.keys() == ib.keys()
        for k in ia:  # the pixel decoder's convolutions round differently per batch size on CPU
            diff = np.abs(ia[k] - ib[k])
            assert diff.max() <= 1 and (diff == 0).mean() > 0.99
    run_generate(_gen_cfg(prompt_table, tar_folder, tmp_path / "c", batch_size=4, seed=100))
    bird_a = next(r for r in pq.read_table(tmp_path / "a" / "00001.parquet").to_pylist() if r["id"] == "bird")
    bird_c = next(r for r in pq.read_table(tmp_path / "c" / "00001.parquet").to_pylist() if r["id"] == "bird")
    assert bird_a["seed"] != bird_c["seed"]
    # the tiny random MLLM is nearly deterministic, but the AR de-tokenizer samples: another seed, another image
    key = bird_a["key"] + ".png"
    assert not np.array_equal(_images(tmp_path / "a" / "00001.tar")[key], _images(tmp_path / "c" / "00001.tar")[key])


def test_prompt_table_errors_are_clear(tmp_path, tar_folder):
    from tarflow.pipelines.generate import PromptTableError, read_prompt_table

    (tmp_path / "p.csv").write_text("name,text\na,b\n")
    with pytest.raises(PromptTableError, match="lacks columns"):
        read_prompt_table(str(tmp_path / "p.csv"))
    (tmp_path / "p.txt").write_text("x")
    with pytest.raises(PromptTableError, match=".parquet, .csv or .jsonl"):
        read_prompt_table(str(tmp_path / "p.txt"))
    (tmp_path / "ok.csv").write_text("id,prompt,seed\n1,a cat,5\n2,a dog,\n")
    rows = read_prompt_table(str(tmp_path / "ok.csv"))
    assert rows[0]["seed"] == 5 and rows[1]["seed"] is None



def test_generate_with_the_diffusion_detokenizer(ray_local, prompt_table, tar_folder, tmp_path):
    pytest.importorskip("diffusers")
    from test_diffusion_detok import _save_tiny_sana  # a tiny random SANA reading 36-wide rec features

    from tarflow.pipelines.generate import run_generate

    sana = _save_tiny_sana(tmp_path / "sana")
    out = tmp_path / "gen"
    summary = run_generate(_gen_cfg(prompt_table, tar_folder, out, batch_size=4, detok="diffusion",
                                    diffusion_detok=str(sana), num_inference_steps=2))
    assert (summary.samples_ok, summary.samples_failed) == (4, 2)
    images = _images(out / "00000.tar")
    assert len(images) == 2 and all(a.shape == (64, 64, 3) for a in images.values())
    manifest = json.loads((out / "_manifest" / "00000.json").read_text())
    assert manifest["detokenizer"]["kind"] == "diffusion" and manifest["detok_sampling"]["num_inference_steps"] == 2

