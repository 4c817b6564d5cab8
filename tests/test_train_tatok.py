"""Training TA-Tok itself: the reference checkpoint layout, the training pass, learning on CPU, the Ray Train job,
and the chain tokenize -> train_mllm with the trained tokenizer.

Models are built here: a tiny random SigLIP teacher (the fixture's siglip_tiny config: hidden 36, 2 layers; at
126 px for the layout, at 84 px = 6x6 tokens for training, to keep CPU steps short) and the demo Qwen2 base
(hidden 32, ~500 ordinary tokens) whose embedding rows become the codebook. One Ray Train run (2 DDP workers) and
one tokenize run in the main group; the train_mllm run, an FSDP/DDP resume and DDP restarts under `cluster`.
"""
from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import reference_fixture

from tarflow.data.sample import ensure_sample_shards
from tarflow.models.demo import ensure_demo_base
from tarflow.models.tatok import TATok, pixels_from_uint8
from tarflow.models.tatok_train import (embedding_rows, load_siglip_folder, load_tokenizer, new_tatok,
                                        rec_distances, select_rows)
from tarflow.train.common import OptimConfig, make_optimizer
from tarflow.train.tatok import TATokTask, TATokTrainConfig, preflight, training_rows

TRAIN_SIZE = 84  # 6 x 6 tokens: scales 1, 2, 3 -> 36, 9, 4 codes
K = 256


def _siglip_folder(root, size: int, name: str = "siglip_tiny") -> str:
    from transformers import SiglipConfig, SiglipModel

    cfg = SiglipConfig.from_json_file(str(reference_fixture("ta_tok") / "siglip_tiny" / "config.json"))
    cfg.vision_config.image_size = size
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = SiglipModel(cfg)
    folder = root / f"{size}" / name
    model.save_pretrained(folder, safe_serialization=True)
    return str(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tatok-models")
    return {"teacher126": _siglip_folder(root, 126), "teacher": _siglip_folder(root, TRAIN_SIZE),
            "llm": str(ensure_demo_base()), "root": root}


@pytest.fixture(scope="module")
def images():
    """The bundled sample, through the tokenize job's reader and decoder stages (called in process)."""
    from tarflow.data.img2dataset import resolve_inputs
    from tarflow.pipelines.image_stages import ImageDecoder, ShardReader

    tables = []
    for s in resolve_inputs(str(ensure_sample_shards())):
        item = pa.Table.from_pylist([{"path": s.path, "name": s.name, "format": s.format, "size": s.size}])
        tables += [training_rows(ImageDecoder(TRAIN_SIZE)(t)) for t in ShardReader()(item)]
    table = pa.concat_tables(tables)
    arr = np.stack([np.frombuffer(p, np.uint8).reshape(TRAIN_SIZE, TRAIN_SIZE, 3)
                    for p in table.column("pixels").to_pylist()])
    return table, pixels_from_uint8(torch.from_numpy(arr))


def _cfg(models, tmp, **kw) -> TATokTrainConfig:
    base = dict(data=[str(ensure_sample_shards())], teacher=models["teacher"], llm=models["llm"], codebook_size=K,
                decoder_depth=1, batch_size=8, usage_window=10, storage_path=str(tmp / "runs"),
                optim=OptimConfig(lr=1e-3, weight_decay=0.0, warmup_ratio=0.0, total_steps=30))
    return TATokTrainConfig(**{**base, **kw})


# ----------------------------------------------------------------------------------------------------------
# The reference format


def _shapes(sd):
    return {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}


def _arg_types(args):
    """The args' nested keys with their value types (values may differ: other sizes are allowed)."""
    if isinstance(args, dict):
        return {k: _arg_types(v) for k, v in args.items()}
    return type(args).__name__


def test_a_new_tatok_has_the_reference_layout_key_for_key_and_arg_for_arg(models, tmp_path):
    fixture = torch.load(reference_fixture("ta_tok") / "ta_tok.pth", map_location="cpu", weights_only=True)["model"]
    enc, sd = load_siglip_folder(models["teacher126"])
    tok = load_tokenizer(models["llm"])
    rows = select_rows(tok, len(tok), K)  # the demo LLM has ~500 ordinary tokens: K 256 (the fixture's 512)
    torch.manual_seed(0)
    model = new_tatok(enc, sd, embedding_rows(models["llm"], rows), teacher="siglip_tiny")
    ckpt = model.checkpoint_dict()
    assert list(ckpt) == ["model"] and sorted(ckpt["model"]) == ["args", "sd"]
    # the fixture's sizes (126 px, hidden 36, D 32, depth 3) but K: every key, shape and dtype equal
    want = _shapes(fixture["sd"]) | {"bottleneck.regularizer.embedding.weight": ((K, 32), torch.float32)}
    assert _shapes(ckpt["model"]["sd"]) == want
    args = json.loads(json.dumps(fixture["args"]))
    args["bottleneck"]["args"]["regularizer"]["args"]["codebook_size"] = K
    assert ckpt["model"]["args"] == args  # every other arg and value (the teacher named as the fixture's)
    assert _arg_types(ckpt["model"]["args"]) == _arg_types(fixture["args"])
    assert json.dumps(ckpt["model"]["args"]) == json.dumps(args)  # key order too
    # it loads strictly (torch.load weights_only) beside its teacher config, and the student starts as the teacher
    os.makedirs(tmp_path / "siglip_tiny")
    (tmp_path / "siglip_tiny" / "config.json").write_text(open(os.path.join(models["teacher126"], "config.json")).read())
    torch.save(ckpt, tmp_path / "ta_tok.pth")
    loaded = TATok.from_checkpoint(str(tmp_path / "ta_tok.pth"), keep_unused=True)
    torch.testing.assert_close(loaded.state_dict(), model.state_dict(), rtol=0, atol=0)
    assert torch.equal(loaded.encoder.encoder.layers[1].mlp.fc1.weight, sd["encoder.layers.1.mlp.fc1.weight"])
    # the codebook starts as the LLM's rows, normalised (embedding_proj = identity)
    emb = embedding_rows(models["llm"], rows)
    torch.testing.assert_close(loaded.bottleneck.regularizer.codebook(), torch.nn.functional.normalize(emb, dim=-1))


@pytest.mark.parametrize("scale", [1, 2, 3])
def test_training_pass_is_the_inference_computation(scale):
    """forward (eval mode, argmax) = encode then decode, on the reference fixture: same codes, same rec."""
    from safetensors.torch import load_file

    d = reference_fixture("ta_tok")
    x, out = load_file(str(d / "inputs.safetensors"))["pixel_values"], load_file(str(d / "outputs.safetensors"))
    model = TATok.from_checkpoint(str(d / "ta_tok.pth"), keep_unused=True)
    model.bottleneck.regularizer.CHUNK = 7  # codes found in chunks of tokens are the whole batch's
    with torch.no_grad():
        got = model(x, scale)
    assert torch.equal(got["codes"], out[f"ps{scale}.bottleneck_rep"])
    torch.testing.assert_close(got["rec"], out[f"ps{scale}.rec"], atol=1e-4, rtol=1e-4)
    # in train mode the straight-through path carries gradients to the encoder and embedding_proj, not the rows
    model.train()
    frozen = set(model.freeze_for_training())
    got = model(x, scale)
    (got["rec"].square().mean() + 0.25 * got["commitment"] + got["codebook"]).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "bottleneck.regularizer.embedding.weight" in frozen and "encoder.head.probe" in frozen
    assert {"encoder.encoder.layers.0.mlp.fc1.weight", "bottleneck.in_linear.weight",
            "bottleneck.regularizer.embedding_proj.weight", "decoder.vision_model.encoder.layers.2.mlp.fc1.weight"} <= grads
    assert not grads & frozen


def test_codebook_rows_are_llm_tokens_by_the_documented_selection(models, tmp_path):
    tok = load_tokenizer(models["llm"])
    special = set(tok.all_special_ids)
    first = select_rows(tok, len(tok), 50)
    assert len(first) == 50 == len(set(first)) and not special & set(first) and first == sorted(first)
    text = "the cat sat on the mat\nthe cat\n" * 3
    freq = select_rows(tok, len(tok), 50, "frequent", text)
    ids = tok("the cat sat on the mat", add_special_tokens=False)["input_ids"]
    the = tok("the", add_special_tokens=False)["input_ids"][0]
    assert freq[0] == the and set(ids) <= set(freq[: len(set(ids)) + 2]) and len(set(freq)) == 50
    from safetensors.torch import load_file

    table = load_file(os.path.join(models["llm"], "model.safetensors"))["model.embed_tokens.weight"]
    assert torch.equal(embedding_rows(models["llm"], freq), table[freq].float())


# ----------------------------------------------------------------------------------------------------------
# Learning, in process (the task's own loss and metrics, the core's optimiser; no Ray)


def _eval_rec(model, task, x) -> float:
    """Reconstruction distance of the deterministic codes (encode -> decode), summed over scales 1, 2, 3."""
    model.eval()
    total = 0.0
    for s in (1, 2, 3):
        cos, mse = rec_distances(model.decode(model.encode(x, s)), task.targets(x, s))
        total += float(cos + mse)
    return total


def test_tatok_learns_on_cpu_and_its_codes_survive_save_and_load(models, images, tmp_path):
    """30 steps on the 8 sample images: the reconstruction distance of the tokenized images falls 1.5x or more,
    codebook usage stays above a floor (with dead-code restarts: without them this tiny codebook collapses onto
    a few codes), and the saved checkpoint gives the same codes."""
    cfg = _cfg(models, tmp_path, usage_window=8, restart_dead_every=8)  # restarts after steps 8, 16, 24
    plan = preflight(cfg)
    table, x = images
    torch.manual_seed(cfg.seed)
    task = TATokTask(cfg, plan, torch.device("cpu"))
    model = task.load_model(None)
    before = _eval_rec(model, task, x)
    model.train()
    opt, sched = make_optimizer(model, cfg.optim)
    history, totals = [], {}  # totals: the core's run totals, kept across steps
    for step in range(cfg.optim.total_steps):
        torch.manual_seed(step)
        opt.zero_grad()
        loss, part = task.loss(model, table)
        loss.backward()
        opt.step()
        sched.step()
        sums = dict.fromkeys(task.sum_keys, 0.0) | part
        task.after_step(totals)  # as the core calls it: once per step, before the metrics
        history.append(task.metrics(sums, totals, 1.0))
    after = _eval_rec(model, task, x)
    assert after < before / 1.5, (before, after)  # measured here: 6.47 -> 2.87 (2.3x)
    assert history[-1]["loss"] < history[0]["loss"] / 2
    assert {f"rec_s{s}" for s in (1, 2, 3)} <= {k for h in history for k in h}  # every scale drawn and reported
    assert all(h["codes_used"] + h["dead_codes"] == K and h["perplexity"] <= h["codes_used"] for h in history)
    assert history[-1]["codes_used"] >= K // 10  # over the last 6 steps (the window restarts with the codes)
    new = np.diff([0] + [h["codes_restarted"] for h in history])  # codes restarted at each step
    assert list(np.flatnonzero(new) + 1) == [8, 16, 24]
    assert all(history[i - 1]["codes_used"] > 0 for i in (8, 16, 24))  # reported before the window's reset
    codes = model.encode(x, 1)
    assert len(torch.unique(codes)) >= K // 5, len(torch.unique(codes))  # >= 20% of the codebook on 8 images
    # the frozen rows changed only by restarts; the text rows of codes never restarted are the LLM's still
    emb = model.bottleneck.regularizer.embedding.weight
    tok_rows = embedding_rows(models["llm"], plan["model"]["source"]["rows"])
    assert history[-1]["codes_restarted"] > 0
    assert (emb == tok_rows).all(1).sum() >= K - history[-1]["codes_restarted"]
    # save and load: the same codes at every scale
    from tarflow.train.tatok import MODEL_FILE, ModelPlan

    task.save_model(model, str(tmp_path))
    assert (tmp_path / "siglip_tiny" / "config.json").exists() and (tmp_path / "codebook_tokens.json").exists()
    loaded = TATok.from_checkpoint(str(tmp_path / MODEL_FILE))
    for s in (1, 2, 3):
        assert torch.equal(loaded.encode(x, s), model.encode(x, s))
    assert ModelPlan(**plan["model"]).codebook_size == loaded.codebook_size == K


def _stream(shards, chunk: int = 3) -> pa.Table:
    """The trainer's row stream of `shards` (the tokenize job's reader and decoder, then training_rows), in
    process and in order, as Ray Data hands it to the workers (one worker, no shuffle)."""
    from tarflow.pipelines.image_stages import ImageDecoder, ShardReader

    tables = []
    for s in shards:
        item = pa.Table.from_pylist([{"path": s.path, "name": s.name, "format": s.format, "size": s.size}])
        tables += [training_rows(ImageDecoder(TRAIN_SIZE)(t)) for t in ShardReader(chunk)(item)]
    return pa.concat_tables(tables)


def test_failed_shards_and_images_reach_the_workers_and_are_counted(models, tmp_path):
    """A shard that cannot be read is a row of its own in the workers' stream (before, only samples reached
    them and the shard vanished): counted in failed_shards (a run total) beside the images that failed to
    decode (skipped_failed), and named in the summary."""
    from tarflow.data.img2dataset import ShardInput, resolve_inputs
    from tarflow.train.run import TrainSummary

    shards = resolve_inputs(str(ensure_sample_shards()))
    gone = ShardInput(path=str(tmp_path / "00002.tar"), name="00002", format="webdataset", size=10)
    table = _stream([shards[0], gone, shards[1]])
    kinds = table.column("kind").to_pylist()
    assert kinds.count("failed") == 1 and kinds.count("sample") == 8
    rows = table.to_pylist()
    bad = next(i for i, r in enumerate(rows) if r["kind"] == "sample")  # an image that failed to decode
    rows[bad] = {**rows[bad], "ok": False, "pixels": None}
    table = pa.Table.from_pylist(rows, schema=table.schema)
    cfg = _cfg(models, tmp_path)
    torch.manual_seed(0)
    task = TATokTask(cfg, preflight(cfg), torch.device("cpu"))
    model = task.load_model(None)
    loss, sums = task.loss(model, table)
    assert torch.isfinite(loss)
    assert (sums["images"], sums["skipped_failed"], sums["failed_shards"], sums["rows"]) == (7, 1, 1, 8)
    totals = {"skipped_failed": 2.0, "failed_shards": 1.0}  # the core's run totals, this step's included
    m = task.metrics(dict.fromkeys(task.sum_keys, 0.0) | sums, totals, 1.0)
    assert (m["skipped_failed"], m["failed_shards"], m["images"]) == (2, 1, 7)
    line = TrainSummary(steps=1, metrics=m, history=[m], starts=[0], checkpoint="c").render("TA-Tok")
    assert "rows skipped {'failed': 2}" in line and "shards failed 1" in line, line


class _Split:
    """What a worker's Ray Data split gives the core: iter_batches over a table, in order."""

    def __init__(self, table):
        self.table = table

    def iter_batches(self, batch_size, drop_last=False, **kw):
        for i in range(0, len(self.table), batch_size):
            if not drop_last or i + batch_size <= len(self.table):
                yield self.table.slice(i, batch_size)


def test_a_read_that_fails_once_then_succeeds_keeps_every_row_where_it_was(models, tmp_path, monkeypatch):
    """A connection reset mid-shard is retried inside the read (reopened, sought back): the trainer's stream is
    row for row the clean one, so the position a checkpoint saved still names the same row and the core's
    exact-resume skip (tarflow.train.data_position.epoch_rows) resumes with the same rows. A failed read that left a
    gap or repeated rows would move every later row, and the resumed run would skip or repeat images."""
    from test_reader_faults import FlakyFS

    from tarflow.data import storage
    from tarflow.data.img2dataset import resolve_inputs
    from tarflow.train.common import TrainState
    from tarflow.train.data_position import epoch_rows

    shards = resolve_inputs(str(ensure_sample_shards()))
    clean = _stream(shards)
    real = storage.filesystem
    fs = FlakyFS(fault_at=shards[0].size // 2, error=ConnectionResetError(104, "Connection reset by peer"), times=1)
    monkeypatch.setattr(storage, "filesystem",
                        lambda p: (fs, os.path.abspath(str(p))) if not storage.is_remote(p) else real(p))
    flaky = _stream(shards)
    assert fs.faults == 1 and fs.opens >= 2  # it broke once, mid-shard, and was reopened
    assert flaky.column("kind").to_pylist() == clean.column("kind").to_pylist() == ["sample"] * 8
    assert flaky.column("pixels").to_pylist() == clean.column("pixels").to_pylist()
    cfg = _cfg(models, tmp_path, shuffle_buffer=0)
    task = TATokTask.__new__(TATokTask)
    task.read_rows, task.drop_last = 2, True
    for seen in (0, 3, 5):  # a checkpoint's data position: the rows after it, from either stream
        resumed = [epoch_rows(_Split(t), task, cfg, TrainState(samples_seen=seen)) for t in (clean, flaky)]
        got = [[(pos, tab.column("pixels").to_pylist()) for pos, tab in r] for r in resumed]
        assert got[0] == got[1] and got[0][0][0] == seen


def test_teacher_and_llm_folders_read_from_s3(models, s3_bucket, monkeypatch):
    """Only the vision weights and the embedding rows are read (by byte ranges), from S3 as from disk: the bytes
    that S3 sends are counted."""
    import s3fs
    from safetensors import safe_open

    fs = s3fs.S3FileSystem()
    for key in ("teacher", "llm"):
        fs.put(models[key].rstrip("/") + "/", f"{s3_bucket}/{key}/".removeprefix("s3://"), recursive=True)
    sent = []  # bytes of every GET's body, through the S3 client itself (ranged or whole-object reads alike)
    real_cat, real_fetch = s3fs.S3FileSystem._cat_file, s3fs.core.S3File._fetch_range

    async def cat_file(self, path, *a, **kw):
        data = await real_cat(self, path, *a, **kw)
        sent.append((path, len(data)))
        return data

    def fetch_range(self, start, end):
        data = real_fetch(self, start, end)
        sent.append((self.path, len(data)))
        return data

    monkeypatch.setattr(s3fs.S3FileSystem, "_cat_file", cat_file)
    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", fetch_range)

    def weights_read(key):
        return sum(n for path, n in sent if path.endswith(f"{key}/model.safetensors"))

    def tensor_bytes(folder, want):
        with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
            return sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys() if want(k))

    enc, sd = load_siglip_folder(f"{s3_bucket}/teacher")
    enc_local, sd_local = load_siglip_folder(models["teacher"])
    assert enc == enc_local and sd.keys() == sd_local.keys() and all(torch.equal(sd[k], sd_local[k]) for k in sd)
    assert not any(k.startswith("text_model") for k in sd)
    vision = tensor_bytes(models["teacher"], lambda k: k.startswith("vision_model."))
    header = 8 + int.from_bytes(open(os.path.join(models["teacher"], "model.safetensors"), "rb").read(8), "little")
    assert weights_read("teacher") == vision + header  # no text tower, no read-ahead around the ranges
    assert os.path.getsize(os.path.join(models["teacher"], "model.safetensors")) > weights_read("teacher")
    rows = [3, 1, 200, 2]
    got = embedding_rows(f"{s3_bucket}/llm", rows)
    assert torch.equal(got, embedding_rows(models["llm"], rows))
    with safe_open(os.path.join(models["llm"], "model.safetensors"), "pt") as f:
        table = f.get_tensor(next(k for k in f.keys() if k.endswith("embed_tokens.weight")))
    assert torch.equal(got, table[rows].float())
    row_bytes = table[0].numel() * table.element_size()
    header = 8 + int.from_bytes(open(os.path.join(models["llm"], "model.safetensors"), "rb").read(8), "little")
    assert weights_read("llm") == header + len(rows) * row_bytes  # those 4 rows, not the matrix
    tok = load_tokenizer(f"{s3_bucket}/llm")  # its small files only, copied to the cache
    assert select_rows(tok, len(tok), 64) == select_rows(load_tokenizer(models["llm"]), len(tok), 64)
    assert not any(p.suffix == ".safetensors" for p in Path(tok.name_or_path).iterdir())


def test_init_continues_a_tatok_with_its_encoder_as_the_teacher(models, images, tmp_path):
    """--init: the student is the checkpoint (codebook and all), the teacher its encoder, frozen; the args and
    the teacher folder carry over."""
    from tarflow.train.tatok import MODEL_FILE

    cfg = _cfg(models, tmp_path)
    task = TATokTask(cfg, preflight(cfg), torch.device("cpu"))
    first = task.load_model(None)
    with torch.no_grad():
        first.encoder.encoder.layers[0].mlp.fc1.weight.add_(0.01)  # a "trained" student, unlike its teacher
    task.save_model(first, str(tmp_path))
    cfg = _cfg(models, tmp_path / "2", teacher=None, llm=None, init=str(tmp_path / MODEL_FILE))
    plan = preflight(cfg)
    assert plan["model"]["teacher_name"] == "siglip_tiny" and plan["model"]["source"] == {"init": cfg.init}
    task = TATokTask(cfg, plan, torch.device("cpu"))
    model = task.load_model(None)
    torch.testing.assert_close(model.state_dict(), first.state_dict(), rtol=0, atol=0)
    assert torch.equal(task.teacher.encoder.layers[0].mlp.fc1.weight, first.encoder.encoder.layers[0].mlp.fc1.weight)
    assert not any(p.requires_grad for p in task.teacher.parameters()) and len(task.teacher.encoder.layers) == 1
    model.train()
    loss, part = task.loss(model, images[0])
    assert part["images"] == 8 and torch.isfinite(loss)
    (tmp_path / "2").mkdir()
    task.save_model(model, str(tmp_path / "2"))
    assert (tmp_path / "2" / "siglip_tiny" / "config.json").exists()
    assert not (tmp_path / "2" / "codebook_tokens.json").exists()  # the rows are the checkpoint's, not an LLM's


def test_bad_arguments_are_reported_together_before_ray_starts(models, tmp_path, capsys, monkeypatch):
    import tarflow.pipelines.runtime

    def no_ray(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(tarflow.pipelines.runtime, "init_ray", no_ray)
    job = _job()
    with pytest.raises(SystemExit) as e:
        job.parse_args(["--help"])
    assert e.value.code == 0 and "--codebook-rows" in capsys.readouterr().out
    for bad in (["--teacher", "t"], ["--init", "a.pth", "--llm", "q"]):  # a new TA-Tok needs both; --init neither
        with pytest.raises(SystemExit):
            job.parse_args(["--data", "x", *bad])
    capsys.readouterr()
    no_llm = tmp_path / "no_llm"
    rc = job.main(["--data", str(tmp_path / "nowhere"), "--teacher", str(tmp_path / "no_teacher"), "--llm",
                   str(no_llm), "--pool-scales", "1,9", "--steps", "0"])
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert rc == 2 and len(lines) == 4, lines
    for what in ("--steps", "--data " + str(tmp_path / "nowhere"), "--teacher " + str(tmp_path / "no_teacher"),
                 "--llm " + str(no_llm)):
        assert sum(line.startswith(f"error: {what}: ") for line in lines) == 1, (what, lines)
    # a codebook larger than the LLM's vocabulary, and a pool scale outside the grid
    rc = job.main(["--data", str(ensure_sample_shards()), "--teacher", models["teacher"], "--llm", models["llm"],
                   "--codebook-size", "100000", "--pool-scales", "1,7"])
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: --codebook-size: only ") and "lower" in lines[0]
    rc = job.main(["--data", str(ensure_sample_shards()), "--teacher", models["teacher"], "--llm", models["llm"],
                   "--codebook-size", "64", "--pool-scales", "1,7"])
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: --pool-scales: [7] outside 1..6"), lines


def _job():
    spec = importlib.util.spec_from_file_location("train_tatok", os.path.join(
        os.path.dirname(__file__), "..", "jobs", "train_tatok.py"))
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


# ----------------------------------------------------------------------------------------------------------
# The Ray Train job, and the tokenize job on its output

JOB_ARGS = ["--codebook-size", str(K), "--decoder-depth", "1", "--batch-size", "2", "--steps", "6", "--lr", "1e-3",
            "--warmup-ratio", "0", "--checkpoint-every", "3", "--log-every", "3", "--keep-checkpoints", "1",
            "--shuffle-buffer", "4", "--usage-window", "4", "--num-workers", "2", "--cpus-per-worker", "0.5"]


@pytest.fixture(scope="module")
def trained(ray_local, models, tmp_path_factory):
    out = tmp_path_factory.mktemp("tatok-job")
    t0 = time.monotonic()
    rc = _job().main(["--data", str(ensure_sample_shards()), "--teacher", models["teacher"], "--llm", models["llm"],
                      *JOB_ARGS, "--storage-path", str(out / "runs"), "--name", "job",
                      "--output", str(out / "model" / "ta_tok.pth"), "--summary-json", str(out / "summary.json")])
    assert rc == 0
    return {"out": out, "path": str(out / "model" / "ta_tok.pth"),
            "summary": json.loads((out / "summary.json").read_text()), "wall_s": time.monotonic() - t0}


def test_ray_train_job_streams_the_sample_and_writes_a_reference_checkpoint(trained, images):
    s = trained["summary"]
    assert [h["step"] for h in s["history"]] == list(range(1, 7)) and s["starts"] == [0]
    # 8 images over 2 DDP workers, 2 each per micro-batch: two steps an epoch, every image decoded by the
    # tokenize job's stages
    assert all(h["images"] == 4 and h["skipped_failed"] == 0 and h["failed_shards"] == 0 for h in s["history"])
    # images/s = the step's images over the step's time: the times it implies add up to less than the run took
    implied = [h["images"] / h["images_per_s"] for h in s["history"]]
    assert all(t > 0 for t in implied) and sum(implied) < trained["wall_s"], (implied, trained["wall_s"])
    assert [h["epoch"] for h in s["history"]] == [0, 0, 1, 1, 2, 2]
    assert all(0 < h["codes_used"] <= K and h["codes_used"] + h["dead_codes"] == K for h in s["history"])
    # each worker draws its own scale per micro-batch: one or two scales reported per step, each a mean
    assert all(1 <= sum(f"rec_s{k}" in h for k in (1, 2, 3)) <= 2 for h in s["history"])
    model_dir = os.path.dirname(trained["path"])
    assert sorted(os.listdir(model_dir)) == ["codebook_tokens.json", "siglip_tiny", "ta_tok.pth"]
    tatok = TATok.from_checkpoint(trained["path"])  # strict
    assert (tatok.codebook_size, tatok.args.bottleneck_dim, tatok.args.teacher) == (K, 32, "siglip_tiny")
    ckpt = s["checkpoint"]
    assert os.path.exists(os.path.join(ckpt, "ta_tok.pth")) and os.path.exists(os.path.join(ckpt, "siglip_tiny"))


@pytest.fixture(scope="module")
def tokenized(trained, tmp_path_factory):
    """The sample tokenized by the trained TA-Tok with the tokenize job."""
    from tarflow.pipelines.tokenize import TokenizeConfig, run_tokenize

    out = tmp_path_factory.mktemp("tatok-tokenized") / "tok"
    run_tokenize(TokenizeConfig(input=str(ensure_sample_shards()), output=str(out), tatok=trained["path"],
                                scales=[1, 2, 3], encode_batch_size=4, decode_batch_size=4, progress_every_s=0))
    return out


@pytest.mark.cluster  # a tokenize run with the trained TA-Tok: `make test-cluster`
def test_tokenize_job_gives_the_trained_tokenizers_codes(trained, tokenized, images):
    from tarflow.data.codeshard import read_code_shard

    rows = pa.concat_tables([read_code_shard(str(p)) for p in sorted((tokenized / "codes").glob("*.parquet"))])
    tatok = TATok.from_checkpoint(trained["path"])
    _, x = images
    for s in (1, 2, 3):  # the job's codes = the saved tokenizer's codes of the same images, at every scale
        assert np.array_equal(np.array(rows.column(f"tatok_s{s}").to_pylist()), tatok.encode(x, s).numpy())


def _mllm_cfg(models, trained, tokenized, tmp_path, **kw):
    from tarflow.train.mllm import MLLMTrainConfig

    return MLLMTrainConfig(data=[str(tokenized)], base=models["llm"], tatok=trained["path"], num_image_tokens=K,
                           scales=[3], task_mix={"i2t": 1, "t2i": 1}, questions=("Describe the image shortly.",),
                           cpus_per_worker=0.5, checkpoint_every=1000, shuffle_buffer=0, max_length=256,
                           storage_path=str(tmp_path / "runs"), name="chain",
                           optim=OptimConfig(lr=3e-3, total_steps=2, warmup_ratio=0.0), **kw)


@pytest.mark.cluster  # builds on the tokenize run above: `make test-cluster`
def test_train_mllm_starts_its_image_rows_from_the_trained_codebook(models, trained, tokenized, tmp_path):
    """The codebook came from the LLM's rows; train_mllm on that LLM with --num-image-tokens K starts its K image
    rows from the trained codebook (normalize(embedding_proj(embedding)))."""
    from tarflow.train.mllm import initial_model, preflight

    cfg = _mllm_cfg(models, trained, tokenized, tmp_path)
    plan = preflight(cfg)  # the shards are accepted: one TA-Tok (this one), K codes <= K image tokens
    assert plan["codebook_size"] == K
    model, tok, _ = initial_model(cfg)
    start = tok.convert_tokens_to_ids("<I0>")
    assert len(tok) - start == K
    codebook = TATok.from_checkpoint(trained["path"]).bottleneck.regularizer.codebook()
    torch.testing.assert_close(model.get_input_embeddings().weight[start:start + K], codebook)


@pytest.mark.cluster  # a second Ray Train run (MLLM): `make test-cluster`
def test_chain_train_mllm_trains_on_the_trained_tatoks_shards(models, trained, tokenized, tmp_path):
    from tarflow.models.mllm import load_tar
    from tarflow.train.mllm import run_train_mllm

    result = run_train_mllm(_mllm_cfg(models, trained, tokenized, tmp_path))
    assert result.steps == 2 and np.isfinite(result.metrics["loss"])
    _, _, vocab = load_tar(result.checkpoint)
    assert vocab.num_image_tokens == K


@pytest.mark.cluster  # two more Ray Train runs: `make test-cluster`
def test_a_run_stopped_under_fsdp_and_resumed_under_ddp_reaches_the_straight_runs_weights(models, trained, tmp_path):
    """3 steps under FSDP, then 3 under DDP from its checkpoint: the weights of the straight 6-step DDP run (the
    job's fixture), so FSDP shards the TA-Tok (frozen rows and all) and the data position, optimiser state,
    schedule and per-step pool scales resume exactly."""
    job = _job()
    common = ["--data", str(ensure_sample_shards()), "--teacher", models["teacher"], "--llm", models["llm"], *JOB_ARGS,
              "--storage-path", str(tmp_path / "runs"), "--name", "job", "--summary-json", str(tmp_path / "s.json")]
    assert job.main([*common, "--strategy", "fsdp", "--stop-at-step", "3"]) == 0
    assert job.main([*common, "--output", str(tmp_path / "model" / "ta_tok.pth")]) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["starts"] == [0, 3] and [h["step"] for h in summary["history"]] == list(range(1, 7))
    want = TATok.from_checkpoint(trained["path"], keep_unused=True).state_dict()
    torch.testing.assert_close(TATok.from_checkpoint(str(tmp_path / "model" / "ta_tok.pth"), keep_unused=True)
                               .state_dict(), want, atol=1e-4, rtol=1e-3)  # FSDP reduces in another order
    assert [h["loss"] for h in summary["history"]] == pytest.approx([h["loss"] for h in trained["summary"]["history"]],
                                                                    rel=1e-4)


@pytest.mark.cluster  # another Ray Train run: `make test-cluster`
def test_dead_code_restarts_on_two_ddp_workers(models, ray_local, tmp_path):
    """Restarts run inside the step's collectives (rank 0's encoder outputs broadcast, every worker writes the
    same rows): the run ends, the restarted rows are no longer the LLM's, the others are."""
    args = [a for a in JOB_ARGS]
    args[args.index("--usage-window") + 1] = "2"
    rc = _job().main(["--data", str(ensure_sample_shards()), "--teacher", models["teacher"], "--llm", models["llm"],
                      *args, "--restart-dead-every", "2", "--storage-path", str(tmp_path / "runs"), "--name", "restarts",
                      "--output", str(tmp_path / "m" / "ta_tok.pth"), "--summary-json", str(tmp_path / "s.json")])
    assert rc == 0
    s = json.loads((tmp_path / "s.json").read_text())
    restarted = s["metrics"]["codes_restarted"]
    assert restarted > 0
    tatok = TATok.from_checkpoint(str(tmp_path / "m" / "ta_tok.pth"))
    ids = json.loads((tmp_path / "m" / "codebook_tokens.json").read_text())["token_ids"]
    same = (tatok.bottleneck.regularizer.embedding.weight == embedding_rows(models["llm"], ids)).all(1)
    assert 0 < int((~same).sum()) <= restarted
