"""Images in, images out: edits through the generate job, questions over several images through the caption job.

The sequences are derived here by hand from the reference's rules (the chat text with each image written as its
`<I..>` tokens, human side bare, gpt side wrapped in `<im_start><S{s-1}>` ... `<im_end>`; tokenized whole, as the
reference tokenizes a rendered conversation), not from tarflow's own builder, which is checked against them.

The edit model: a tiny Tar (hidden 64, Tar's full vocabulary, frozen random embeddings) trained in-process by
plain teacher forcing on 16 edit pairs over the 8 bundled photos' codes at scale 3 (9 codes each): "next"
turns photo i into photo i+1, "previous" into photo i-1, so the answer depends on both the image and the
instruction. The loss is over the image tokens at the 9 answer positions, the tokens the generate job samples
from; a few seconds on one core.
"""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import reference_fixture
from convshards import write_keyed_conversation_shard

SCALE = 3
INSTRUCTIONS = {"next": 1, "previous": -1}


def reference_ids(tokenizer, turns, images, scale=SCALE, answer_image=False) -> list[int]:
    """The reference's input ids of a conversation up to the answer: its chat text, images as <I..> tokens."""
    text = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    k = 0
    for who, value in turns:
        role = "user" if who == "human" else "assistant"
        pieces = value.split("<image>")
        content = pieces[0]
        for piece in pieces[1:]:
            image = "".join(f"<I{c}>" for c in images[k])
            k += 1
            content += (image if role == "user" else f"<im_start><S{scale - 1}>{image}<im_end>") + piece
        text += f"<|im_start|>{role}\n{content}<|im_end|>\n"
    text += "<|im_start|>assistant\n" + (f"<im_start><S{scale - 1}>" if answer_image else "")
    assert k == len(images)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def tokenizer():
    import tiny_tar

    return tiny_tar.tar_tokenizer()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """[(path of the JPEG, its bytes, its 9 codes at scale 3)] for the 8 bundled photos, each encoded alone."""
    from PIL import Image

    from tarflow.data.sample import sample_photos
    from tarflow.models.tatok import TATok, pixels_from_uint8

    tatok = TATok.from_checkpoint(str(reference_fixture("ta_tok") / "ta_tok.pth"))
    folder = tmp_path_factory.mktemp("photos")
    out = []
    for name, data, _ in sample_photos():
        S = tatok.input_size
        px = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((S, S), Image.BICUBIC))
        codes = tatok.encode(pixels_from_uint8(torch.from_numpy(px[None].copy())), SCALE)[0].tolist()
        (folder / f"{name}.jpg").write_bytes(data)
        out.append((str(folder / f"{name}.jpg"), data, codes))
    assert len({tuple(c) for _, _, c in out}) == 8
    return out


def edit_target(i: int, instruction: str) -> int:
    return (i + INSTRUCTIONS[instruction]) % 8


def test_prompts_follow_the_sequence_rules(tokenizer, photos):
    from tarflow.models.mllm import (ConversationError, TarVocab, conversation_prompt_ids, edit_prompt_ids,
                                     i2t_prompt_ids, t2i_prompt_ids)

    vocab = TarVocab.from_tokenizer(tokenizer)
    a, b, c = (p[2] for p in photos[:3])
    # an edit: the image read, then "\n" + the instruction; the answer opens as an image at the scale
    assert edit_prompt_ids(tokenizer, vocab, "next", [a], SCALE) == reference_ids(
        tokenizer, [("human", "<image>\nnext")], [a], answer_image=True)
    # marks in the instruction place the images; without them the images come first
    assert edit_prompt_ids(tokenizer, vocab, "Put <image> beside <image>.", [a, b], SCALE) == reference_ids(
        tokenizer, [("human", "Put <image> beside <image>.")], [a, b], answer_image=True)
    assert edit_prompt_ids(tokenizer, vocab, "merge", [a, b], SCALE) == reference_ids(
        tokenizer, [("human", "<image><image>\nmerge")], [a, b], answer_image=True)
    # a variation (no instruction): the image alone
    assert edit_prompt_ids(tokenizer, vocab, None, [a], SCALE) == reference_ids(
        tokenizer, [("human", "<image>")], [a], answer_image=True)
    # a multi-turn conversation: an image the model wrote earlier is wrapped, with the scale token
    turns = [("human", "Draw a cat."), ("gpt", "<image>"), ("human", "<image>\n<image>\nSame?")]
    assert conversation_prompt_ids(tokenizer, vocab, turns, [a, b, c], SCALE) == reference_ids(
        tokenizer, turns, [a, b, c])
    # the bulk jobs' one-image prompts are the same conversations
    assert conversation_prompt_ids(tokenizer, vocab, [("human", "<image>\nWhat is it?")], [a], SCALE) == \
        i2t_prompt_ids(tokenizer, vocab, a, "What is it?")
    assert conversation_prompt_ids(tokenizer, vocab, [("human", "A cat.")], [], SCALE, answer_image=True) == \
        t2i_prompt_ids(tokenizer, vocab, "A cat.", SCALE)
    with pytest.raises(ConversationError, match="image_count_mismatch"):
        conversation_prompt_ids(tokenizer, vocab, [("human", "<image> and <image>")], [a], SCALE)


def test_prompts_are_what_the_trainer_builds_up_to_the_answer(tokenizer, photos):
    """The trainer's SampleBuilder on a conversation row: its ids up to the answer are the inference prompt."""
    from tarflow.models.mllm import TarVocab, conversation_prompt_ids
    from tarflow.train.mllm import SampleBuilder

    vocab = TarVocab.from_tokenizer(tokenizer)
    a = photos[0][2]
    builder = SampleBuilder(tokenizer, {"i2t": 1, "t2i": 0, "text": 0}, [SCALE], {SCALE: 9}, ["?"],
                            "You are a helpful assistant.", 4096, 0, 512)
    turns = [{"from": "human", "value": "<image>\nWhat is in it?"}, {"from": "gpt", "value": "A photo."}]
    # a conversation code shard's row holds one code list per image; the first trainer took the row's one list
    for codes in ([a], a):
        try:
            ids, labels, task, skip = builder.build({"key": "k", "conversations": turns, f"tatok_s{SCALE}": codes},
                                                    0)
        except (TypeError, ValueError) as e:
            ids, labels, task, skip = [], [], "i2t", repr(e)
        if not skip:
            break
    assert not skip, skip
    prompt = conversation_prompt_ids(tokenizer, vocab, [("human", turns[0]["value"])], [a], SCALE)
    assert ids[:len(prompt)] == prompt and len(ids) > len(prompt)


# -- the edit model --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def edit_tar(tokenizer, photos, tmp_path_factory):
    """A tiny Tar folder trained on the 16 edit pairs until greedy decoding gives every target's codes."""
    import tiny_tar

    from tarflow.models.mllm import TarVocab

    vocab = TarVocab.from_tokenizer(tokenizer)
    codes = [c for _, _, c in photos]
    seqs, targets = [], []
    for i in range(8):
        for instruction in INSTRUCTIONS:
            target = codes[edit_target(i, instruction)]
            seqs.append(reference_ids(tokenizer, [("human", f"<image>\n{instruction}")], [codes[i]],
                                      answer_image=True) + [vocab.image_base_id + c for c in target])
            targets.append(target)
    L = max(map(len, seqs))
    x = torch.full((len(seqs), L), vocab.pad_id)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for k, s in enumerate(seqs):  # left padding, positions from each row's first token, as the decoder does
        x[k, L - len(s):], mask[k, L - len(s):] = torch.tensor(s), 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    y = torch.tensor(targets)  # (16, 9): predicted at positions L-10 .. L-2
    model = tiny_tar.tiny_tar_model(seed=0, hidden=64, layers=2, heads=4, kv_heads=2)
    emb = model.get_input_embeddings().weight  # tied: also the output rows
    emb.requires_grad_(False)
    rows = emb[vocab.image_base_id:vocab.image_base_id + 512]  # the TA-Tok's 512 codes: what the job samples
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    torch.manual_seed(0)
    model.train()
    for step in range(400):
        h = model.model(input_ids=x, attention_mask=mask, position_ids=pos).last_hidden_state[:, L - 10:L - 1]
        logits = h @ rows.T  # (16, 9, 512)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 512), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 19 and bool((logits.argmax(-1) == y).all()):
            break
    model.eval()
    with torch.no_grad():
        h = model.model(input_ids=x, attention_mask=mask, position_ids=pos).last_hidden_state[:, L - 10:L - 1]
    assert bool(((h @ rows.T).argmax(-1) == y).all()), "the tiny Tar did not learn the edit pairs"
    return tiny_tar.save_tiny_tar(tmp_path_factory.mktemp("edit-tar") / "tar", model=model)


def _gen_cfg(prompts, mllm, output, **kw):
    from tarflow.pipelines.generate import GenerateConfig

    ref = reference_fixture("ta_tok").parent
    return GenerateConfig(prompts=str(prompts), output=str(output), mllm=mllm,
                          tatok=str(ref / "ta_tok" / "ta_tok.pth"), ar_detok=str(ref / "ar_dtok" / "ar_dtok.pth"),
                          vq=str(ref / "vqvae" / "vq.pt"), scale=SCALE, top_k=1, samples_per_shard=4,
                          progress_every_s=0, **kw)


def _members(tar_path) -> dict:
    with tarfile.open(tar_path) as t:
        return {n: t.extractfile(n).read() for n in t.getnames()}


@pytest.fixture(scope="module")
def edit_table(photos, tmp_path_factory):
    """An edit table (Parquet, `image` as Hugging Face Image structs) with good and bad rows, and --codes."""
    folder = tmp_path_factory.mktemp("edits")
    tatok = str(reference_fixture("ta_tok") / "ta_tok.pth")
    conv = write_keyed_conversation_shard(folder / "convs.parquet", [
        {"key": "000000000", "images": [{SCALE: photos[2][2]}], "sha256": ["ab" * 32], "path": ["p2.jpg"],
         "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}]},
        {"key": "000000001", "images": [{SCALE: photos[5][2]}, {SCALE: photos[6][2]}],
         "conversations": [{"from": "human", "value": "<image><image>\nAny difference?"}]},
    ], tatok)
    (folder / "junk.jpg").write_bytes(b"not an image at all")
    path = lambda i: {"bytes": None, "path": photos[i][0]}  # noqa: E731
    rows = [
        {"id": "next0", "prompt": "next", "image": path(0)},                                   # -> photo 1
        {"id": "prev3-bytes", "prompt": "previous", "image": {"bytes": photos[3][1], "path": None}},  # -> photo 2
        {"id": "prev2-key", "prompt": "previous", "image": {"bytes": None, "path": "convs/000000000"}},  # -> 1
        {"id": "next6-key#1", "prompt": "<image>\nnext", "image": {"bytes": None, "path": "000000001#1"}},  # -> 7
        {"id": "t2i", "prompt": "A photo of a cat.", "image": None},
        {"id": "missing", "prompt": "next", "image": {"bytes": None, "path": str(folder / "nope.jpg")}},
        {"id": "junk", "prompt": "next", "image": {"bytes": None, "path": str(folder / "junk.jpg")}},
        {"id": "count", "prompt": "<image> then <image>: next", "image": path(0)},
        {"id": "nokey", "prompt": "next", "image": {"bytes": None, "path": "convs/000000009"}},
        {"id": "next4", "prompt": "next", "image": path(4)},                                   # -> photo 5
    ]
    table = folder / "edits.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([
        pa.field("id", pa.string()), pa.field("prompt", pa.string()),
        pa.field("image", pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())]))])), table)
    return table, conv


EXPECTED = {"next0": 1, "prev3-bytes": 2, "prev2-key": 1, "next6-key#1": 7, "next4": 5}
FAILED = {"missing": "image_not_found", "junk": "not_an_image", "count": "image_count_mismatch",
          "nokey": "image_key_not_found"}


@pytest.mark.cluster  # minutes on 2 cores: the heavier group (make test-cluster)
def test_an_edit_table_through_the_generate_job(ray_local, edit_tar, edit_table, photos, tmp_path):
    """Edit rows give the trained targets' codes under greedy sampling, whatever the batch size; bad rows fail
    alone with their reason; each image's .json says what it was made from."""
    import hashlib

    from tarflow.pipelines.generate import run_generate

    table, conv = edit_table
    runs = {}
    for bs in (1, 3):
        out = tmp_path / f"b{bs}"
        summary = run_generate(_gen_cfg(table, edit_tar, out, codes=[conv], batch_size=bs))
        assert (summary.samples_in, summary.samples_ok, summary.samples_failed) == (10, 6, 4)
        assert dict(summary.failed_by_reason) == {r: 1 for r in FAILED.values()}
        metas, pixels = {}, {}
        for shard in ("00000", "00001", "00002"):
            members = _members(out / f"{shard}.tar")
            for name, data in members.items():
                if name.endswith(".json"):
                    m = json.loads(data)
                    metas[m["id"]] = m
                    pixels[m["id"]] = np.asarray(__import__("PIL.Image").Image.open(
                        io.BytesIO(members[name[:-5] + ".png"]))).astype(int)
        errors = {}
        for shard in ("00000", "00001", "00002"):
            for e in pq.read_table(out / "errors" / f"{shard}.parquet").to_pylist():
                errors[e["key"]] = e
        runs[bs] = metas, pixels
        for rid, target in EXPECTED.items():
            assert metas[rid]["codes"] == photos[target][2], rid
            assert metas[rid]["scale"] == SCALE and metas[rid]["instruction"] == metas[rid]["prompt"]
        assert metas["next0"]["input_images"] == [{"key": None, "path": photos[0][0],
                                                   "sha256": hashlib.sha256(photos[0][1]).hexdigest()}]
        assert metas["prev3-bytes"]["input_images"][0]["sha256"] == hashlib.sha256(photos[3][1]).hexdigest()
        assert metas["prev2-key"]["input_images"] == [{"key": "convs/000000000", "path": "p2.jpg",
                                                       "sha256": "ab" * 32}]
        assert metas["next6-key#1"]["input_images"][0]["key"] == "000000001#1"
        assert "input_images" not in metas["t2i"]  # a T2I row's output is as it always was
        reasons = sorted(e["reason"] for e in errors.values())
        assert reasons == sorted(FAILED.values())
    (m1, p1), (m3, p3) = runs[1], runs[3]
    assert {k: m["codes"] for k, m in m1.items()} == {k: m["codes"] for k, m in m3.items()}
    for k in p1:  # the pixel decoder's convolutions round differently per batch size on CPU
        assert np.abs(p1[k] - p3[k]).max() <= 1, k


@pytest.mark.cluster  # one more generate run (~20 s): the edit path above is in make test already
def test_self_reflection_with_input_images(ray_local, edit_tar, edit_table, photos, tmp_path):
    """Candidates of an edit are scored against its instruction; the kept one is still the trained target."""
    from tarflow.pipelines.generate import run_generate

    table, conv = edit_table
    out = tmp_path / "reflect"
    summary = run_generate(_gen_cfg(table, edit_tar, out, codes=[conv], batch_size=3, reflect=True, candidates=2,
                                    keep=1))
    assert (summary.samples_ok, summary.samples_failed) == (6, 4) and summary.extra["reflect_candidates_scored"] == 12
    members = _members(out / "00000.tar")
    first = json.loads(next(v for k, v in members.items() if k.endswith(".json")))
    assert first["id"] == "next0" and first["codes"] == photos[1][2] and 0 <= first["reflect_score"] <= 1
    assert first["input_images"][0]["path"] == photos[0][0] and first["candidates"] == 2


def test_bad_prompt_tables_and_codes_are_refused_before_ray(tmp_path, edit_table):
    from tarflow.pipelines.generate import GenerateConfig
    from tarflow.preflight import Problems

    table, conv = edit_table
    (tmp_path / "noid.jsonl").write_text(json.dumps({"image": "a.png"}) + "\n")
    p = Problems()
    GenerateConfig(prompts=str(tmp_path / "noid.jsonl"), output=str(tmp_path / "o"), mllm="m",
                   tatok=str(reference_fixture("ta_tok") / "ta_tok.pth"),
                   codes=[str(tmp_path / "none")]).input_problems(p)
    assert len(p.lines) == 2 and "lacks columns ['id']" in p.lines[0] and "none" in p.lines[1], p.lines
    # code shards made with another TA-Tok are refused: their codes would be other images
    p = Problems()
    GenerateConfig(prompts=str(table), output=str(tmp_path / "o"), mllm="m",
                   tatok=str(reference_fixture("ar_dtok") / "ar_dtok.pth"), codes=[conv]).input_problems(p)
    assert len(p.lines) == 1 and "another TA-Tok" in p.lines[0], p.lines


# -- questions over several images through the caption job ----------------------------------------------------


@pytest.fixture(scope="module")
def random_tar(tmp_path_factory):
    import tiny_tar

    return tiny_tar.save_tiny_tar(tmp_path_factory.mktemp("tar") / "tiny-tar", hidden=16, heads=2, kv_heads=1)


@pytest.mark.cluster  # minutes on 2 cores: the heavier group (make test-cluster)
def test_questions_over_several_images_through_the_caption_job(ray_local, tokenizer, photos, random_tar, tmp_path):
    """Each row is answered as Hugging Face generate answers the hand-derived prompt; every input column is kept
    and the answer appended to `conversations`; bad rows fail alone; the batch size changes nothing."""
    from tarflow.models.mllm import load_tar
    from tarflow.pipelines.caption import CaptionConfig, run_caption

    a, b, c = (p[2] for p in photos[:3])
    human = lambda v: {"from": "human", "value": v}  # noqa: E731
    rows = [
        {"key": "000000000", "images": [{SCALE: a}, {SCALE: b}], "source": "two",
         "conversations": [human("<image>\n<image>\nWhat differs?")]},
        {"key": "000000001", "images": [{SCALE: c}, {SCALE: a}], "source": "written",
         "conversations": [human("Draw a cat."), {"from": "gpt", "value": "<image>"}, human("<image>\nSame?")]},
        {"key": "000000002", "images": [], "source": "text", "conversations": [human("Say hi.")]},
        {"key": "000000003", "images": [{SCALE: a}], "source": "answered",
         "conversations": [human("<image>\nWhat?"), {"from": "gpt", "value": "A photo."}]},
    ]
    folder = tmp_path / "codes"
    folder.mkdir()
    write_keyed_conversation_shard(folder / "convs.parquet", rows, str(reference_fixture("ta_tok") / "ta_tok.pth"))
    # a shard whose rows carry their own question (and one whose marks do not match its images)
    qschema = pa.schema([pa.field("question", pa.string()), pa.field("conversations", pa.string())])
    write_keyed_conversation_shard(folder / "questions.parquet", [
        {"key": "000000000", "images": [{SCALE: b}, {SCALE: c}], "question": "Compare <image> with <image>.",
         "conversations": "[]"},
        {"key": "000000001", "images": [{SCALE: b}], "question": "<image> <image> <image>?", "conversations": "[]"},
    ], str(reference_fixture("ta_tok") / "ta_tok.pth"), passthrough=qschema)
    outs = {}
    for bs in (1, 4):
        out = tmp_path / f"out{bs}"
        summary = run_caption(CaptionConfig(input=str(folder), output=str(out), model=random_tar, scale=SCALE,
                                            max_new_tokens=5, batch_size=bs, progress_every_s=0))
        assert (summary.samples_in, summary.samples_ok, summary.samples_failed) == (6, 4, 2)
        assert dict(summary.failed_by_reason) == {"last_turn_not_human": 1, "image_count_mismatch": 1}
        outs[bs] = {n: pq.read_table(out / "captions" / f"{n}.parquet") for n in ("convs", "questions")}
    assert {n: t.to_pylist() for n, t in outs[1].items()} == {n: t.to_pylist() for n, t in outs[4].items()}
    model, tok, vocab = load_tar(random_tar)
    expected_prompts = {
        ("convs", "000000000"): reference_ids(tok, [("human", "<image>\n<image>\nWhat differs?")], [a, b]),
        ("convs", "000000001"): reference_ids(tok, [("human", "Draw a cat."), ("gpt", "<image>"),
                                                    ("human", "<image>\nSame?")], [c, a]),
        ("convs", "000000002"): reference_ids(tok, [("human", "Say hi.")], []),
        ("questions", "000000000"): reference_ids(tok, [("human", "Compare <image> with <image>.")], [b, c]),
    }
    got = {(n, r["key"]): r for n, t in outs[1].items() for r in t.to_pylist()}
    assert set(got) == set(expected_prompts)
    for k, ids in expected_prompts.items():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False, eos_token_id=vocab.eos_id,
                             pad_token_id=vocab.pad_id)[0, len(ids):].tolist()
        ref = ref[:ref.index(vocab.eos_id)] if vocab.eos_id in ref else ref
        assert got[k]["caption"] == tok.decode(ref, skip_special_tokens=True).strip(), k
        assert got[k]["prompt_tokens"] == len(ids)
    # every input column is kept, the answer appended to the conversation
    two = got[("convs", "000000000")]
    assert two["source"] == "two" and two["num_images"] == 2 and two[f"tatok_s{SCALE}"] == [a, b]
    assert two["prompt"] == "<image>\n<image>\nWhat differs?"
    assert two["conversations"] == [human("<image>\n<image>\nWhat differs?"), {"from": "gpt", "value": two["caption"]}]
    q = got[("questions", "000000000")]
    assert q["question"] == "Compare <image> with <image>." and json.loads(q["conversations"]) == [
        {"from": "gpt", "value": q["caption"]}]
    errors = pq.read_table(tmp_path / "out1" / "errors" / "convs.parquet").to_pylist()
    assert [(e["key"], e["reason"]) for e in errors] == [("000000003", "last_turn_not_human")]


def test_an_edit_csv_runs_on_the_demo_models_with_no_model_argument(ray_local, photos, tmp_path, capsys, caplog):
    import importlib.util
    import os
    import shutil

    spec = importlib.util.spec_from_file_location("generate_job", os.path.join(
        os.path.dirname(__file__), "..", "jobs", "generate.py"))
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    shutil.copy(photos[0][0], tmp_path / "photo.jpg")
    (tmp_path / "edits.csv").write_text("id,prompt,image\nsky,Make the sky red.,photo.jpg\ncat,A cat.,\n")
    rc = job.main(["--prompts", str(tmp_path / "edits.csv"), "--output", str(tmp_path / "out"), "--scale", "3",
                   "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    assert "RANDOM, UNTRAINED demo model" in caplog.text and "images: 2 in = 2 ok + 0 failed" in captured.out
    metas = [json.loads(v) for k, v in _members(tmp_path / "out" / "00000.tar").items() if k.endswith(".json")]
    assert metas[0]["id"] == "sky" and metas[0]["input_images"][0]["path"] == "photo.jpg"
    assert metas[0]["instruction"] == "Make the sky red." and "input_images" not in metas[1]
