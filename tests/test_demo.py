"""`make demo` (jobs/demo.py) and the demo data it makes: the conversation mix maker (tarflow/data/demo_mix.py),
and the whole chain end to end exactly as `make demo` runs it (cluster group: minutes on 2 CPUs)."""
from __future__ import annotations

import ast
import io
import os
import re
import subprocess
import sys
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from tarflow.data.demo_mix import DEMO_MIX, IMAGE_MARK, write_demo_mix
from tarflow.data.sample import SAMPLE_PHOTOS, ensure_sample_shards

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _photos():
    """Three small distinct photos (name, JPEG bytes, caption): the maker takes any photos."""
    out = []
    for k, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        buf = io.BytesIO()
        im = Image.new("RGB", (24, 16), colour)
        im.paste((255, 255, 255), (0, 0, 8, 16))  # a white left third: its mirror image has it on the right
        im.save(buf, format="JPEG", quality=95)
        out.append((f"p{k}", buf.getvalue(), f"Caption number {k}."))
    return out


def _images(row) -> list[dict]:
    img = row.get("image")
    return [] if img is None else img if isinstance(img, list) else [img]


def test_demo_mix_is_a_miniature_of_the_reference_mix(tmp_path):
    photos = _photos()
    mix = write_demo_mix(tmp_path / "mix", photos)
    config = yaml.safe_load(mix.read_text())
    # the reference's data_demo.yaml shape: datasets: [{json_path: [folders], ratio, name: parquet}]
    assert list(config) == ["datasets"]
    assert [(len(d["json_path"]), d["ratio"], d["name"]) for d in config["datasets"]] == \
        [(len(g.sources), g.ratio, "parquet") for g in DEMO_MIX]
    assert [d["ratio"] for d in config["datasets"][:2]] == [2, 4] and config["datasets"][-1]["ratio"] == 1
    tables = {}
    for entry in config["datasets"]:
        for folder in entry["json_path"]:
            files = [f for f in os.listdir(folder) if f.endswith(".parquet")]  # the reference globs *.parquet
            assert os.path.isabs(folder) and len(files) == 1
            tables[os.path.basename(os.path.dirname(folder))] = pq.read_table(os.path.join(folder, files[0]))
    assert sorted(tables) == sorted(s for g in DEMO_MIX for s in g.sources)

    turns = pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    n = len(photos)
    kinds = {}
    for name, table in tables.items():
        assert table.schema.field("conversations").type == turns and table.schema.field("id").type == pa.string()
        if "image" in table.schema.names:
            assert table.schema.field("image").type in (image, pa.list_(image))
        rows = table.to_pylist()
        assert len({r["id"] for r in rows}) == len(rows)
        for r in rows:
            conv = r["conversations"]
            assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2) and conv
            marks = [t["value"].count(IMAGE_MARK) for t in conv]
            imgs = _images(r)
            assert sum(marks) == len(imgs), (name, r["id"])  # every <image> has its image, in order
            for im in imgs:
                assert Image.open(io.BytesIO(im["bytes"])).size == (24, 16) and im["path"].endswith(".jpg")
            written = sum(m for t, m in zip(conv, marks) if t["from"] == "gpt")
            kinds.setdefault(name, set()).add((sum(marks) - written, written))  # (images read, images written)
    # what each source is: captions read (I2T), two images read, text only (null image), T2I, an edit, text
    assert kinds["llava-recap"] == {(1, 0)} and len(tables["llava-recap"]) == n
    assert kinds["llava-sft"] == {(2, 0), (0, 0)} and None in tables["llava-sft"].column("image").to_pylist()
    assert kinds["t2i"] == {(0, 1)} and kinds["edit"] == {(1, 1)} and kinds["text"] == {(0, 0)}
    assert "image" not in tables["text"].schema.names  # as Magpie: no image column at all
    recap = tables["llava-recap"].to_pylist()
    assert [r["conversations"][1]["value"] for r in recap] == [c for _, _, c in photos]
    assert [r["image"]["bytes"] for r in recap] == [d for _, d, _ in photos]
    t2i = tables["t2i"].to_pylist()
    assert [(r["conversations"][0]["value"], r["conversations"][1]["value"]) for r in t2i] == \
        [(c, IMAGE_MARK) for _, _, c in photos]
    # the edit's target is the source photo mirrored; the two-image question is answered from the second image
    for r in tables["edit"].to_pylist():
        a, b = (Image.open(io.BytesIO(im["bytes"])).convert("RGB") for im in r["image"])
        assert min(a.getpixel((2, 8))) > 230 and min(b.getpixel((21, 8))) > 230 and min(b.getpixel((2, 8))) < 230
    by_caption = {d: c for _, d, c in photos}
    for r in tables["llava-sft"].to_pylist():
        if r["image"]:
            assert r["conversations"][1]["value"] == by_caption[r["image"][1]["bytes"]]
    # deterministic: the same bytes again
    again = write_demo_mix(tmp_path / "again", photos)
    for s in tables:
        f = os.path.join("data", "train-00000-of-00001.parquet")
        assert pq.read_table(tmp_path / "again" / s / f).equals(pq.read_table(tmp_path / "mix" / s / f))
    assert again.read_text() == mix.read_text().replace(str(tmp_path / "mix"), str(tmp_path / "again"))


@pytest.mark.cluster
def test_make_demo_runs_end_to_end_and_its_outputs_are_what_the_readme_says(tmp_path):
    """jobs/demo.py as `make demo` runs it: a subprocess, a fresh TARFLOW_HOME (the demo models made on first use),
    its own output folder. The README's claims: every step runs; the trained Tar gives back the photos' captions
    (7/8 or more); 8 generated images; the de-tokenizers and the TA-Tok are trained and written."""
    out = tmp_path / "demo"
    env = dict(os.environ, TARFLOW_HOME=str(tmp_path / "home"))
    proc = subprocess.run([sys.executable, "jobs/demo.py", "--output", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=3600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    check_demo_outputs(out, proc.stdout, log)


def check_demo_outputs(out, stdout: str, log: str) -> None:
    """What the README says `make demo` gives (outputs in `out`, its printed `stdout`, all of it in `log`)."""
    # no traceback of the demo's own (Ray workers' log lines, prefixed "(Name pid=...)", may carry Ray's own noise)
    assert not [ln for ln in log.splitlines() if ln.startswith("Traceback")], log[-5000:]
    conversations = _job("demo").CONVERSATION_STEPS
    total = 7 + 2 * conversations
    assert re.search(rf"=== 7/{total} train \(continue\) the demo TA-Tok", stdout), stdout[-3000:]
    assert "RANDOM, UNTRAINED demo model" in log  # the demo family announces itself
    # 3: the demo Tar gives back the photos' own captions, 7 of 8 or more (README: the rocket's and the Hubble deep
    # field's scale-3 codes are nearly the same); what it prints is what its outputs hold
    own = {r["key"]: r["caption"] for r in pq.read_table(out / "codes" / "codes").to_pylist()}
    got = {r["key"]: r["caption"] for r in pq.read_table(out / "captions" / "captions").to_pylist()}
    right = sum(got[k] == c for k, c in own.items())
    assert f"photos captioned with their own caption: {right}/{len(SAMPLE_PHOTOS)}" in stdout
    assert right >= len(SAMPLE_PHOTOS) - 1 and set(got.values()) <= {c for _, c in SAMPLE_PHOTOS}, got
    # 4: 8 images from the sample's captions, PNGs of the demo VQ's resolution
    pngs = []
    for f in sorted(os.listdir(out / "images")):
        if f.endswith(".tar"):
            with tarfile.open(out / "images" / f) as tar:
                pngs += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".png")]
    assert len(pngs) == len(SAMPLE_PHOTOS)
    assert {Image.open(io.BytesIO(p)).size for p in pngs} == {(128, 128)}
    # 1: code shards with the TA-Tok codes at scales 1 and 3, the VQ codes and the SANA latents
    codes = pq.read_table(out / "codes" / "codes")
    assert codes.num_rows == len(SAMPLE_PHOTOS)
    assert {"tatok_s1", "tatok_s3", "vq16_128", "latents_64"} <= set(codes.column_names)
    # 5-7: every trainer wrote its model, loadable
    from tarflow.models.ar_detok import ARDetokenizer
    from tarflow.models.diffusion_detok import DiffusionDetokenizer
    from tarflow.models.tatok import TATok

    ARDetokenizer.from_checkpoint(str(out / "ar_dtok_demo.pth"))
    assert DiffusionDetokenizer.from_pretrained(str(out / "sana_demo")).condition_width == 96
    assert TATok.from_checkpoint(str(out / "tatok_demo" / "ta_tok.pth")).codebook_size == 1024
    for what in ("code shards", "trained demo Tar MLLM", "captions", "generated images", "trained AR de-tokenizer",
                 "trained SANA de-tokenizer", "trained TA-Tok"):
        assert re.search(rf"^  {re.escape(what)}.* /", stdout, re.M), what
    if conversations:  # the sample as a miniature of the reference's mix, tokenized and trained on
        assert f"=== {total}/{total} train the demo Tar MLLM on the conversation mix" in stdout
        for source in ("llava-recap", "llava-sft", "t2i", "edit", "text"):
            assert os.listdir(out / "conversation-codes" / source / "codes"), source
        assert (out / "conversation-codes" / "mix.yaml").exists()
        # every task of the miniature mix was drawn: the edit (ti2i), two-image questions, T2I, I2T and text
        # the mix run is the last trainer to print its counts (step 2's caption run prints its own, all i2t)
        counts = re.findall(r"samples per task (\{.*?\})", stdout)
        assert len(counts) >= 2, stdout[-2000:]
        per_task = ast.literal_eval(counts[-1])
        assert all(per_task.get(t, 0) > 0 for t in ("i2t", "t2i", "ti2i", "multi_image", "text")), per_task


def _job(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "jobs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["train_mllm", "train_ar_detok", "train_diffusion_detok"])
def test_code_trainers_take_no_model_and_no_data_as_the_demo(name, tmp_path, monkeypatch, capsys):
    """With neither a model argument nor --data, a code-shard trainer takes the demo models and what `make demo`
    wrote (out/demo/codes, relative to where it runs); without that folder it says to run `make demo` first."""
    job = _job(name)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        job.parse_args([])
    assert e.value.code == 2 and "run `make demo` first" in capsys.readouterr().err
    (tmp_path / "out" / "demo" / "codes").mkdir(parents=True)
    args = job.parse_args([])
    assert args.data == ["out/demo/codes"] and "using the demo data out/demo/codes" in capsys.readouterr().err
    assert not (getattr(args, "tatok", None) or getattr(args, "init", None) or getattr(args, "base", None))
    assert job.parse_args(["--data", "elsewhere"]).data == ["elsewhere"]
    if name != "train_mllm":  # a TA-Tok given without a model to go with it is not the demo
        with pytest.raises(SystemExit):
            job.parse_args(["--tatok", "t.pth"])


def test_ar_trainer_arguments_after_the_demo_default(tmp_path):
    job = _job("train_ar_detok")
    with pytest.raises(SystemExit):
        job.parse_args(["--data", "x", "--n-layer", "2"])  # sizes come all together
    args = job.parse_args(["--data", "x", "--preset", "llama-abs-S"])  # the demo TA-Tok with a new model
    assert args.tatok is None and args.init is None and args.preset == "llama-abs-S"


def test_tatok_trainer_with_no_arguments_continues_the_demo_tatok_on_the_sample(capsys):
    job = _job("train_tatok")
    args = job.parse_args([])
    assert args.demo and args.data == [str(ensure_sample_shards())] and "bundled sample" in capsys.readouterr().err
    assert not job.parse_args(["--init", "t.pth"]).demo
    with pytest.raises(SystemExit):
        job.parse_args(["--teacher", "siglip"])  # a new TA-Tok needs both --teacher and --llm


def test_readme_first_run_then_caption_as_it_is(ray_local, tmp_path, monkeypatch, capsys, caplog):
    """The README's first commands as they are, where a new user runs them: `make run` (the tokenize job with no
    arguments: the bundled sample, the demo TA-Tok, out/tokenize-sample/), then `python jobs/caption.py` (its
    output, the demo Tar)."""
    monkeypatch.chdir(tmp_path)
    assert _job("tokenize_laion").main(["--no-progress"]) == 0
    assert "samples: 8 in = 8 ok + 0 failed" in capsys.readouterr().out
    assert _job("caption").main(["--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "RANDOM, UNTRAINED demo model" in caplog.text and str(tmp_path / "out" / "caption-sample") in printed
    rows = pq.read_table(tmp_path / "out" / "caption-sample" / "captions").to_pylist()
    assert len(rows) == 8 and all(isinstance(r["caption"], str) for r in rows)
