"""Training the Tar MLLM on code shards with Ray Train (CPU, tiny models, fractional-CPU workers)."""
from __future__ import annotations

import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import reference_fixture

from tarflow.data import storage
from tarflow.data.codeshard import read_code_shard
from tarflow.preflight import UsageError
from tarflow.train.common import OptimConfig
from tarflow.train.footers import read_footers
from tarflow.train.mllm import IGNORE, MLLMTrainConfig, SampleBuilder, block_causal_mask, pack
from tarflow.train.mllm import packed_loss, preflight, run_train_mllm


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    """A tiny 'base' Qwen2 with the plain Qwen2.5 tokenizer (no Tar tokens yet)."""
    import tiny_tar

    return tiny_tar.save_tiny_base(tmp_path_factory.mktemp("base") / "qwen-tiny", hidden=32)


@pytest.fixture(scope="module")
def code_shards(ray_local, tmp_path_factory):
    from tarflow.data.sample import ensure_sample_shards
    from tarflow.pipelines.tokenize import TokenizeConfig, run_tokenize

    out = tmp_path_factory.mktemp("tok") / "out"
    run_tokenize(TokenizeConfig(input=str(ensure_sample_shards()), output=str(out),
                                tatok=str(reference_fixture("ta_tok") / "ta_tok.pth"), scales=[1, 2, 3],
                                progress_every_s=0))
    return out


@pytest.fixture(scope="module")
def builder(code_shards, tmp_path_factory):
    import tiny_tar

    folder = tmp_path_factory.mktemp("tok2") / "tar-tokenizer"
    tiny_tar.tar_tokenizer().save_pretrained(folder)
    return SampleBuilder(str(folder), {"i2t": 1, "t2i": 1, "text": 1}, [3], {1: 81, 2: 16, 3: 9},
                         ["Describe the image shortly."], "You are a helpful assistant.", 512, 0, 512)


def _repeated(code_shards, times: int, path) -> str:
    """The sample rows `times` over under distinct keys (each copy draws its own task and scale), as one code
    shard: Ray Data starts every epoch anew, which costs seconds, so tests make few long epochs."""
    shards = sorted((code_shards / "codes").glob("*.parquet"))
    rows = [r for shard in shards for r in read_code_shard(str(shard)).to_pylist()]
    copies = [{**r, "key": f"{r['key']}/{k}"} for k in range(times) for r in rows]
    pq.write_table(pa.Table.from_pylist(copies, schema=read_code_shard(str(shards[0])).schema), path)
    return str(path)


def _row(code_shards, i=0):
    return read_code_shard(str(code_shards / "codes" / "00000.parquet")).to_pylist()[i]


def test_samples_follow_the_reference_layout_and_masking(builder, code_shards):
    t, v = builder.tokenizer, builder.vocab
    row = _row(code_shards)
    seen = set()
    for epoch in range(12):
        ids, labels, task, skip = builder.build(row, epoch)
        assert not skip and len(ids) == len(labels)
        seen.add(task)
        text = t.decode(ids)
        assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
        learned = [i for i, lab in zip(ids, labels) if lab != IGNORE]
        user_end = ids.index(t.convert_tokens_to_ids("<|im_start|>"), 3)  # the user turn's start
        # system and user turns: only <|im_start|>, <|im_end|> and "\n" are learned
        assert {i for i, lab in zip(ids[:user_end + 1], labels[:user_end + 1]) if lab != IGNORE} <= builder.unmasked
        codes = [c for c in row["tatok_s3"]]
        if task == "t2i":
            answer = [v.image_start_tag_id, v.scale_token_id(3)] + v.codes_to_ids(codes) + [v.image_end_tag_id]
            k = ids.index(v.image_start_tag_id)
            assert ids[k:k + len(answer)] == answer and labels[k:k + len(answer)] == answer
            assert row["caption"] in text
        else:
            k = ids.index(v.code_to_id(codes[0]))
            assert ids[k:k + 9] == v.codes_to_ids(codes) and all(lab == IGNORE for lab in labels[k:k + 9])
            assert t.decode(learned).count(row["caption"]) == 1
    assert seen == {"i2t", "t2i"}


def test_bad_rows_are_skipped_with_a_reason(builder, code_shards):
    row = _row(code_shards)
    cases = {"missing_codes": {**row, "tatok_s3": None}, "wrong_code_length": {**row, "tatok_s3": [1, 2, 3]},
             "codes_out_of_range": {**row, "tatok_s3": [600] * 9}, "empty_caption": {**row, "caption": " "}}
    for reason, bad in cases.items():
        assert builder.build(bad, 0)[3] == reason
    long = SampleBuilder.__new__(SampleBuilder)
    long.__dict__.update(builder.__dict__, max_length=20)
    assert long.build(row, 0)[3] == "too_long"


def test_conversation_rows_put_the_codes_at_image_and_text_only_rows_are_the_text_task(builder, code_shards):
    t, v = builder.tokenizer, builder.vocab
    codes = _row(code_shards)["tatok_s3"]
    chat = {"id": "c1", "tatok_s3": codes, "conversations": [
        {"from": "human", "value": "Look: <image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]}
    ids, labels, task, skip = builder.build(chat, 0)
    assert (task, skip) == ("i2t", "")
    text = t.decode(ids)
    assert "<|im_start|>user\nLook: " + "".join(f"<I{c}>" for c in codes) + "\nWhat is it?<|im_end|>" in text
    assert t.decode([i for i, lab in zip(ids, labels) if lab != IGNORE]).count("A cat.") == 1
    assert all(lab == IGNORE for i, lab in zip(ids, labels) if v.is_image_id(i))  # the image is never a target
    text_only = {"id": "c2", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi!"}]}
    ids, labels, task, skip = builder.build(text_only, 0)
    assert (task, skip) == ("text", "") and not any(v.is_image_id(i) for i in ids)
    assert builder.build({**chat, "tatok_s3": None}, 0)[3] == "missing_codes"


def test_data_without_code_shard_metadata_is_taken_as_tar_codes(code_shards, tmp_path):
    from tarflow.train.mllm import TAR_TATOK_FACTS, data_facts

    pq.write_table(pa.table({"id": ["a"], "conversations": [[{"from": "human", "value": "hi"}]]}),
                   tmp_path / "chat.parquet")
    facts = data_facts(read_footers([str(tmp_path / "chat.parquet")]))
    assert (facts["tokens_per_scale"], facts["codebook_size"]) == TAR_TATOK_FACTS
    shard = str(code_shards / "codes" / "00000.parquet")
    facts = data_facts(read_footers([str(tmp_path / "chat.parquet"), shard]))
    assert (facts["tokens_per_scale"], facts["codebook_size"]) == ({1: 81, 2: 16, 3: 9}, 512)
    assert facts["rows"] == {"caption": 4, "image_chat": 0, "text": 1}


def test_the_task_mix_text_weight_sets_the_share_of_text_only_samples(builder, code_shards, tmp_path):
    """i2t=2,t2i=4,text=1 on as many caption rows as text-only rows: about 2/7, 4/7 and 1/7 of the samples."""
    from tarflow.train.mllm import count_row_kinds, text_keep_probability

    chats = [{"id": f"t{i}", "conversations": [{"from": "human", "value": f"Say {i}."},
                                               {"from": "gpt", "value": f"{i}!"}]} for i in range(3)]
    chats.append({"id": "img", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                 {"from": "gpt", "value": "A cat."}]})
    pq.write_table(pa.Table.from_pylist(chats), tmp_path / "chat.parquet")
    assert count_row_kinds(read_footers([str(tmp_path / "chat.parquet")])) == {"caption": 0, "image_chat": 1,
                                                                               "text": 3}
    mix = {"i2t": 2, "t2i": 4, "text": 1}
    n = 700
    keep = text_keep_probability(mix, {"caption": n, "image_chat": 0, "text": n})
    assert keep == pytest.approx(1 / 6)
    mixed = SampleBuilder.__new__(SampleBuilder)
    mixed.__dict__.update(builder.__dict__, task_mix=mix, text_keep=keep)
    row = _row(code_shards)
    tasks = [mixed.build({**row, "key": f"k{i}"}, 0) for i in range(n)]
    tasks += [mixed.build({**chats[0], "id": f"c{i}"}, 0) for i in range(n)]
    built = [t for _, _, t, skip in tasks if not skip]
    share = {t: built.count(t) / len(built) for t in ("i2t", "t2i", "text")}
    assert share == pytest.approx({"i2t": 2 / 7, "t2i": 4 / 7, "text": 1 / 7}, abs=0.035)
    assert {skip for _, _, t, skip in tasks if t == "text" and skip} == {"task_mix"}
    # text=0: no text-only sample at all; fewer text rows than the mix asks for: all are kept
    assert text_keep_probability({**mix, "text": 0}, {"caption": n, "text": n}) == 0.0
    assert text_keep_probability(mix, {"caption": n, "text": n // 10}) == 1.0


def test_packing_isolates_samples():
    """A packed row gives every sample the loss it has alone: positions restart, no attention across."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    m = Qwen2ForCausalLM(Qwen2Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)).eval()
    samples = [(list(range(5, 15)), list(range(5, 15)), 0), (list(range(30, 37)), [IGNORE] * 3 + list(range(33, 37)), 1),
               (list(range(50, 54)), list(range(50, 54)), 0)]
    batch = pack(samples, max_length=24, pad_id=0)
    assert batch["input_ids"].shape == (1, 21) and batch["padding"] == 0.0
    assert batch["position_ids"][0].tolist() == list(range(10)) + list(range(7)) + list(range(4))
    with torch.no_grad():
        loss, per_task = packed_loss(m, batch, torch.device("cpu"))
        total, count = 0.0, 0
        for s in samples:
            b = pack([s], 24, 0)
            l1, _ = packed_loss(m, b, torch.device("cpu"))
            n = sum(1 for x in s[1][1:] if x != IGNORE)
            total, count = total + float(l1) * n, count + n
    assert abs(float(loss) - total / count) < 1e-5
    assert per_task["i2t"][1] == 9 + 3 and per_task["t2i"][1] == 4
    two = pack(samples, max_length=12, pad_id=0)
    assert two["input_ids"].shape[0] == 2 and 0 < two["padding"] < 0.5
    mask = block_causal_mask(torch.as_tensor(two["segments"]), torch.float32)
    assert torch.isfinite(mask).logical_not().sum() == 0 and (mask[0, 0, 10, :10] < -1e30).all()


def _cfg(tmp_path, code_shards, base_folder, **kw):
    kw.setdefault("optim", OptimConfig(lr=3e-3, total_steps=6, warmup_ratio=0.0))
    kw.setdefault("max_length", 256)
    kw.setdefault("storage_path", str(tmp_path / "runs"))
    kw.setdefault("tatok", str(reference_fixture("ta_tok") / "ta_tok.pth"))
    return MLLMTrainConfig(data=[str(code_shards)], base=base_folder, scales=[3],
                           task_mix={"i2t": 1, "t2i": 1}, questions=("Describe the image shortly.",),
                           cpus_per_worker=0.5, checkpoint_every=1000, shuffle_buffer=0, **kw)


def _upload(folder: str, url: str) -> str:
    fs, p = storage.filesystem(url)
    fs.put(folder.rstrip("/") + "/", p + "/", recursive=True)
    return url


def test_initial_model_is_built_from_an_s3_base_and_saved_in_the_bases_dtype(code_shards, base_folder, tmp_path,
                                                                            s3_bucket):
    """What a worker prepares from `--base s3://...` (a bf16 base): a local copy first, Tar's vocabulary added, image
    rows from the TA-Tok codebook, float32 master weights, and checkpoints in bf16 again (config.json says so)."""
    from safetensors.torch import load_file
    from transformers import Qwen2ForCausalLM

    from tarflow.models.mllm import load_tar
    from tarflow.models.tatok import TATok
    from tarflow.train.mllm import folder_dtype, initial_model, save_tar

    bf16 = tmp_path / "bf16"
    Qwen2ForCausalLM.from_pretrained(base_folder, local_files_only=True).to(torch.bfloat16).save_pretrained(bf16)
    import tiny_tar

    tiny_tar.qwen25_tokenizer().save_pretrained(bf16)
    assert folder_dtype(str(bf16)) == torch.bfloat16
    cfg = _cfg(tmp_path, code_shards, _upload(str(bf16), f"{s3_bucket}/models/bf16"), num_image_tokens=512)
    plan = preflight(cfg)  # the S3 folder passes the driver's checks; nothing is built there
    assert cfg.base.startswith("s3://") and cfg.resume_from is None and plan["codebook_size"] == 512
    model, tok, dtype = initial_model(cfg)
    assert dtype == torch.bfloat16 and next(model.parameters()).dtype == torch.float32 and len(tok) == 151665 + 517
    rows = model.get_input_embeddings().weight[tok.convert_tokens_to_ids("<I0>"):]
    codebook = TATok.from_checkpoint(cfg.tatok).bottleneck.regularizer.codebook().detach()
    torch.testing.assert_close(rows, codebook.to(torch.bfloat16).float())  # through the base's dtype
    save_tar(model, tok, str(tmp_path / "ckpt"), dtype)
    weights = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}
    assert folder_dtype(str(tmp_path / "ckpt")) == torch.bfloat16
    assert load_tar(str(tmp_path / "ckpt"))[2].num_image_tokens == 512


def test_a_tar_folder_given_as_base_is_continued_from_its_rows(code_shards, tmp_path):
    """--base TAR_FOLDER without --tatok used to replace every image row with the mean embedding."""
    import tiny_tar
    from safetensors.torch import load_file

    from tarflow.train.mllm import MLLMTask

    tar = tiny_tar.save_tiny_tar(tmp_path / "tar", hidden=32, seed=3)
    cfg = _cfg(tmp_path, code_shards, tar, tatok=None)
    plan = preflight(cfg)
    assert (cfg.base, cfg.resume_from) == (None, tar)
    model = MLLMTask(cfg, plan, torch.device("cpu")).load_model(None)
    saved = load_file(os.path.join(tar, "model.safetensors"))["model.embed_tokens.weight"]
    torch.testing.assert_close(model.get_input_embeddings().weight, saved.float())


def test_bad_arguments_and_paths_are_reported_together_before_ray_starts(code_shards, base_folder, tmp_path,
                                                                         capsys, monkeypatch):
    import importlib.util

    import tarflow.pipelines.runtime

    def no_ray(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(tarflow.pipelines.runtime, "init_ray", no_ray)
    spec = importlib.util.spec_from_file_location("train_mllm", os.path.join(os.path.dirname(__file__), "..", "jobs",
                                                                             "train_mllm.py"))
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    for argv, expected in (
        (["--base", str(tmp_path / "no-base"), "--data", str(tmp_path / "no-data"), "--tatok", str(tmp_path / "t.pth")],
         [f"--base {tmp_path / 'no-base'}: not found", f"--data {tmp_path / 'no-data'}: not found",
          f"--tatok {tmp_path / 't.pth'}: not found"]),
        (["--base", str(tmp_path / "half"), "--data", str(code_shards), "--num-image-tokens", "100"],
         [f"--base {tmp_path / 'half'}: not a Hugging Face model folder: no *.safetensors weights, tokenizer files",
          "--num-image-tokens: the code shards' TA-Tok has 512 codes"]),
    ):
        assert job.main(argv) == 2
        lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
        assert len(lines) == len(expected), lines
        for want in expected:
            line, = [line for line in lines if line.startswith(f"error: {want}")]
            assert "; " in line  # with its fix
    # another TA-Tok than the one that made the codes
    other = tmp_path / "other.pth"
    other.write_bytes(b"not the TA-Tok")
    assert job.main(["--base", base_folder, "--data", str(code_shards), "--tatok", str(other)]) == 2
    line, = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert f"were tokenized by another TA-Tok than --tatok {other}" in line and "00000.parquet" in line


@pytest.mark.cluster  # minutes on 2 cores: the heavier group (make test-cluster)
def test_two_workers_loss_falls_bad_rows_are_counted_and_checkpoint_loads(ray_local, code_shards, base_folder,
                                                                           tmp_path, s3_bucket, monkeypatch):
    """Also: --base on S3 (copied by the workers), the driver builds no model, and --keep-checkpoints 2 leaves
    the last two of the four checkpoints."""
    import transformers

    from tarflow.models.mllm import fetch_model_folder, load_tar
    from tarflow.models.tatok import TATok

    def not_on_the_driver(*a, **k):
        raise AssertionError("the driver built a model")

    for cls in (transformers.Qwen2ForCausalLM, transformers.AutoTokenizer, TATok):
        monkeypatch.setattr(cls, "from_pretrained" if cls is not TATok else "from_checkpoint",
                            classmethod(not_on_the_driver))
    # one more shard whose rows are all broken: wrong code length, codes out of the codebook, no caption
    src = read_code_shard(str(code_shards / "codes" / "00000.parquet"))
    rows = src.to_pylist()
    rows[0]["tatok_s3"] = rows[0]["tatok_s3"][:5]
    rows[1]["tatok_s3"] = [511] * 8 + [600]
    rows[2]["caption"] = ""
    rows[3]["tatok_s3"] = rows[3]["tatok_s3"] + [1]
    pq.write_table(pa.Table.from_pylist(rows, schema=src.schema), tmp_path / "bad.parquet")
    cfg = _cfg(tmp_path, code_shards, _upload(base_folder, f"{s3_bucket}/models/qwen-tiny"), num_workers=2,
               name="two", storage_path=f"{s3_bucket}/runs", optim=OptimConfig(lr=3e-3, total_steps=8, warmup_ratio=0.0))
    cfg.data.append(str(tmp_path / "bad.parquet"))
    cfg.checkpoint_every, cfg.log_every = 2, 2
    t0 = time.monotonic()
    result = run_train_mllm(cfg)
    wall = time.monotonic() - t0
    losses = [m["loss"] for m in result.history]
    assert [m["step"] for m in result.history] == list(range(1, 9))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses  # over a window, not one noisy pair
    assert result.steps == 8 and 0 <= result.metrics["padding_fraction"] < 1
    # tokens/s = the step's useful tokens over the step's time: a whole number of tokens, at most 2 workers x a
    # row of 256 less padding (rows are as long as their longest, <= 256), in steps that add up to less than the
    # run took (a rate per millisecond, or over padded positions, would not)
    useful = [m["tokens_per_s"] * m["step_seconds"] for m in result.history]
    assert all(abs(u - round(u)) < 1e-3 * u for u in useful), useful
    assert all(0 < u <= 2 * 256 * (1 - m["padding_fraction"]) + 1e-3 for u, m in zip(useful, result.history))
    assert sum(m["step_seconds"] for m in result.history) < wall, (result.history, wall)
    assert any("loss_i2t" in m for m in result.history) and any("loss_t2i" in m for m in result.history)
    # counted over both workers: each broken row once per epoch it was read in
    skipped = {k: v for k, v in result.metrics.items() if k.startswith("skipped_")}
    # the broken rows count 2, 1, 1 in every epoch read whole (0 .. E-1), and at most that again in epoch E, the
    # one the run ended in (each worker's rows are read as its batches need them)
    per_epoch = {"skipped_wrong_code_length": 2, "skipped_codes_out_of_range": 1, "skipped_empty_caption": 1}
    epoch = result.history[-1]["epoch"]
    assert epoch >= 1 and set(skipped) == set(per_epoch), (epoch, skipped)
    assert all(epoch * n <= skipped[k] <= (epoch + 1) * n for k, n in per_epoch.items()), (epoch, skipped)
    assert result.checkpoint.startswith(f"{s3_bucket}/runs/two/checkpoint_")  # on S3
    fs, run = storage.filesystem(f"{s3_bucket}/runs/two")
    fs.invalidate_cache()
    kept = sorted(p for p in fs.glob(run + "/checkpoint_2*"))  # checkpoint folders are named by time
    assert len(kept) == 2 and kept[-1].endswith(result.checkpoint.rsplit("/", 1)[-1])  # of those at steps 2, 4, 6, 8
    monkeypatch.undo()
    model, tok, vocab = load_tar(result.checkpoint)
    assert len(tok) == 217206 and model.config.vocab_size >= 217206
    transformers.Qwen2ForCausalLM.from_pretrained(fetch_model_folder(result.checkpoint), local_files_only=True)


@pytest.fixture(scope="module")
def straight_run(ray_local, code_shards, base_folder, tmp_path_factory):
    """6 steps on 2 DDP workers in one go: what interrupted and sharded runs are compared with."""
    return run_train_mllm(_accum_cfg(tmp_path_factory.mktemp("straight"), code_shards, base_folder, name="straight"))


def _accum_cfg(tmp_path, code_shards, base_folder, **kw):
    """2 workers, each step 2 micro-batches of one row of 2 samples (the accumulating ones are not reduced);
    the rows 3 times over: 3 steps per epoch; each worker's rows shuffled (seeded) in a buffer of 8."""
    cfg = _cfg(tmp_path, code_shards, base_folder, num_workers=2, max_length=128,
               optim=OptimConfig(lr=3e-3, total_steps=6, warmup_ratio=0.0, grad_accum=2), **kw)
    cfg.shuffle_buffer = 8
    cfg.data = [_repeated(code_shards, 3, tmp_path / "x3.parquet")]
    return cfg


def _assert_same_weights(a, b):
    from safetensors.torch import load_file

    wa, wb = (load_file(os.path.join(r.checkpoint, "model.safetensors")) for r in (a, b))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


@pytest.mark.cluster  # minutes on 2 cores: the heavier group (make test-cluster)
def test_a_run_stopped_and_resumed_under_alternating_strategies_reaches_the_straight_runs_weights(
        straight_run, code_shards, base_folder, tmp_path):
    """2 steps under FSDP, 2 under DDP, 2 under FSDP, a checkpoint between each (FSDP gathers weights and
    optimiser state into the same files DDP writes): the weights of 6 straight DDP steps. So FSDP does DDP's
    arithmetic on shards, each strategy resumes the other's checkpoint, and the optimiser state, schedule and
    each worker's (shuffled) data position all resume."""
    from tarflow.models.mllm import load_tar

    cfg = _accum_cfg(tmp_path, code_shards, base_folder, name="split")
    for strategy, step in (("fsdp", 2), ("ddp", 4), ("fsdp", 6)):
        cfg.strategy, cfg.stop_at_step = strategy, step  # absolute: the step to stop after
        result = run_train_mllm(cfg)
        assert result.steps == step
    assert result.starts == [0, 2, 4] and [m["step"] for m in result.history] == list(range(1, 7))
    _assert_same_weights(straight_run, result)
    load_tar(result.checkpoint)  # the bulk jobs' loader takes it as it is


def test_unknown_strategy_is_refused_before_any_worker_starts(code_shards, base_folder, tmp_path):
    with pytest.raises(UsageError, match="--strategy: unknown parallel strategy 'zero3'"):
        run_train_mllm(_cfg(tmp_path, code_shards, base_folder, strategy="zero3"))


@pytest.mark.cluster  # fault injection: run by `make test-cluster`
def test_a_run_from_a_tar_checkpoint_survives_a_worker_killed_mid_run(ray_local, code_shards, tmp_path):
    """--resume-from a Tar folder (no vocabulary change), and a worker process dying at step 3."""
    import functools

    import tiny_tar
    from faults import die_once_after_report
    from safetensors.torch import load_file

    from tarflow.models.mllm import load_tar
    from tarflow.train.mllm import train_loop_per_worker

    tar = tiny_tar.save_tiny_tar(tmp_path / "tar", hidden=32, seed=3)
    marker = str(tmp_path / "died")
    cfg = _cfg(tmp_path, code_shards, None, name="killed", resume_from=tar)
    cfg.checkpoint_every, cfg.log_every = 2, 1  # step 3 is reported, without a checkpoint
    result = run_train_mllm(cfg, train_loop=functools.partial(die_once_after_report, train_loop_per_worker),
                            loop_extra={"marker": marker, "die_after_step": 3})
    assert os.path.exists(marker)  # the worker did die
    assert result.steps == 6 and result.starts == [0, 2]  # restarted from step 2 and finished
    start = load_file(os.path.join(tar, "model.safetensors"))
    trained = load_file(os.path.join(result.checkpoint, "model.safetensors"))
    assert len(load_tar(result.checkpoint)[1]) == len(tiny_tar.tar_tokenizer())
    assert trained.keys() == start.keys()
    # trained from the given weights: close to them after 6 small steps, and moved
    w0, w1 = start["model.layers.0.mlp.up_proj.weight"], trained["model.layers.0.mlp.up_proj.weight"]
    assert 0 < (w1 - w0).abs().max() < 0.1


@pytest.mark.cluster  # minutes on 2 cores: the heavier group (make test-cluster)
def test_learning_is_real_captions_from_codes_and_codes_from_captions(ray_local, code_shards, base_folder, tmp_path):
    """A tiny Tar trained on the 8 sample rows reproduces, greedily, each row's caption from its codes (I2T)
    and its codes from its caption (T2I), with the inference prompts the bulk jobs use."""
    from tarflow.models.generation import BatchedDecoder, Sampling
    from tarflow.models.mllm import i2t_prompt_ids, load_tar, parse_image_codes, t2i_prompt_ids

    rows = [r for shard in sorted((code_shards / "codes").glob("*.parquet"))
            for r in read_code_shard(str(shard)).to_pylist()]
    assert len(rows) == 8 and len({tuple(r["tatok_s3"]) for r in rows}) == 8
    # 512 image tokens (the fixture TA-Tok's codebook, width 32 = the base's hidden size): image rows start from
    # the codebook, as Tar's do from its 65,536 x D one
    cfg = _cfg(tmp_path, code_shards, base_folder, num_workers=2, name="learn", num_image_tokens=512,
               optim=OptimConfig(lr=2e-2, total_steps=150, warmup_ratio=0.05))
    cfg.data = [_repeated(code_shards, 25, tmp_path / "x25.parquet")]  # 6 epochs of 25 steps
    result = run_train_mllm(cfg)
    assert result.steps == 150
    model, tok, vocab = load_tar(result.checkpoint)
    assert vocab.num_image_tokens == 512
    question = cfg.questions[0]
    dec = BatchedDecoder(model, vocab.pad_id)
    captions = dec.generate([i2t_prompt_ids(tok, vocab, r["tatok_s3"], question) for r in rows], 40,
                            Sampling(greedy=True), stop_ids=(vocab.eos_id,))
    assert [tok.decode(c, skip_special_tokens=True).strip() for c in captions.tokens] == [r["caption"] for r in rows]
    images = dec.generate([t2i_prompt_ids(tok, vocab, r["caption"], 3) for r in rows], 9, Sampling(greedy=True),
                          allowed_range=vocab.image_id_range)
    assert [parse_image_codes(g, vocab, 9)[0] for g in images.tokens] == [list(r["tatok_s3"]) for r in rows]
