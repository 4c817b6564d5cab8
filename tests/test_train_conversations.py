"""The MLLM trainer on Tar's own corpora: conversations with images read and written, any number per row, and
the reference's data mix (tarflow.train.mix). Corpora are conversation code shards written by tests/convshards.py."""
from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import reference_fixture
from convshards import tatok_facts, write_conversation_shard

from tarflow.train.mllm import IGNORE, SampleBuilder

SCALES = (1, 2, 3)
TOKENS = {1: 81, 2: 16, 3: 9}  # the fixture TA-Tok's codes per pool scale (9 x 9 grid)


def image(seed: int) -> dict:
    """One image's codes at every scale (codebook 512), distinct per seed."""
    return {s: [(seed * 37 + 11 * k + s) % 512 for k in range(n)] for s, n in TOKENS.items()}


@pytest.fixture(scope="module")
def fixture_tok(tmp_path_factory):
    """The reference's own tokenizer (Qwen2.5 + Tar's tokens, saved by the reference's code), as the fixture's
    README says to load it."""
    from transformers import AutoTokenizer

    d = reference_fixture("mllm")
    folder = tmp_path_factory.mktemp("fixture_tok")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).write_bytes(gzip.decompress((d / f"{name}.gz").read_bytes()))
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


@pytest.fixture(scope="module")
def facts():
    return tatok_facts(reference_fixture("ta_tok") / "ta_tok.pth")


def _builder(tok, **kw):
    args = dict(task_mix={"i2t": 1, "t2i": 1, "text": 1}, scales=[3], tokens_per_scale=TOKENS,
                questions=["Describe the image shortly."], system="You are a helpful assistant.", max_length=4096,
                seed=0, codebook_size=512)
    args.update(kw)
    return SampleBuilder(tok, **args)


def test_conversations_become_the_reference_sequences_and_labels(fixture_tok, facts, tmp_path):
    """Five rows of a conversation code shard; their ids and labels derived here by hand from the reference's
    rules (llava/data/dataset.py preprocess_multimodal + preprocess_qwen, llava_arch.py
    prepare_inputs_labels_for_multimodal), on the reference's saved tokenizer:

    - the system turn, then per turn `<|im_start|>{role}\\n{value}<|im_end|>\\n` (human -> user, gpt -> assistant),
      each turn tokenized alone, `<image>` an added token (so text is tokenized in the runs between images);
    - labels: system and user turns IGNORE except ids 198 ("\\n"), 151644 (<|im_start|>), 151645 (<|im_end|>):
      preprocess_qwen's unmask list [198, im_start, im_end] with im_start, im_end =
      additional_special_tokens_ids[:2], the chat tokens; 624 (".\\n") is another token and stays masked;
      assistant turns: their ids;
    - a human <image>: the image's codes (151670 + c), labels IGNORE; a gpt <image>: written
      `<im_start><image><im_end>` (151665 ... 151666), and since the label before it is <im_start> the image
      becomes the pool-scale token <S{s-1}> (151667 + s - 1) + codes, those the labels too;
    - the k-th <image> over all turns is the row's k-th code list; all at the sample's one pool scale (3 here).
    """
    ref = reference_fixture("mllm")
    t2i_fixture = json.loads((ref / "t2i_input_ids.json").read_text())
    IM_START, IM_END, NL = 151644, 151645, 198  # <|im_start|>, <|im_end|>, "\n"
    TAG_START, TAG_END, S2, I0 = 151665, 151666, 151669, 151670  # <im_start>, <im_end>, <S2> (scale 3), <I0>

    def enc(s):  # plain text, as the reference's tokenizer splits it
        return fixture_tok(s, add_special_tokens=False)["input_ids"]

    def masked(ids):  # a system or user turn's labels
        return [i if i in (NL, IM_START, IM_END) else IGNORE for i in ids]

    def codes(img):
        return [I0 + c for c in img[3]]

    # "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    SYSTEM = [IM_START, 8948, NL, 2610, 525, 264, 10950, 17847, 13, IM_END, NL]
    USER, ASSISTANT, END = [IM_START, 872, NL], [IM_START, 77091, NL], [IM_END, NL]  # "user\n", "assistant\n"
    assert SYSTEM == t2i_fixture[:11]  # the reference's own T2I prompt starts so
    cat = [32, 6548, 315, 264, 8251, 13]  # "A photo of a cat." (the fixture's T2I prompt)
    assert enc("A photo of a cat.") == cat
    what = enc("\nWhat is this?")
    assert what[0] == NL  # "\n" before a word is its own token 198: unmasked inside the user's text
    A, B = image(1), image(2)

    rows = {
        "i2t": ([{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A photo of a cat."}],
                [A]),
        "t2i": ([{"from": "human", "value": "A photo of a cat."}, {"from": "gpt", "value": "<image>"}], [B]),
        "multi_image": ([{"from": "human", "value": "<image>\n<image>\nAre they the same?"},
                         {"from": "gpt", "value": "Hi!"}], [A, B]),
        "ti2i": ([{"from": "human", "value": "<image>\nMake it red."}, {"from": "gpt", "value": "<image>"}], [A, B]),
        "text": ([{"from": "gpt", "value": "Hello."},  # not the human's: the reference drops a first such turn
                  {"from": "human", "value": "Say hi.\nPlease."}, {"from": "gpt", "value": "Hi!"}], []),
    }
    expected = {}
    # I2T: the image read, then "\nWhat is this?"; the answer learned
    user = USER + codes(A) + what + END
    answer = ASSISTANT + cat + END
    expected["i2t"] = (SYSTEM + user + answer, masked(SYSTEM) + masked(user) + answer)
    # T2I: "user\n" and the caption tokenized together (as the fixture's prompt); the image written and learned
    user = [IM_START] + enc("user\nA photo of a cat.") + END
    assert user == t2i_fixture[11:22]
    answer = ASSISTANT + [TAG_START, S2] + codes(B) + [TAG_END] + END
    expected["t2i"] = (SYSTEM + user + answer, masked(SYSTEM) + masked(user) + answer)
    # two images read, the "\n" between them a lone 198 (unmasked)
    user = USER + codes(A) + [NL] + codes(B) + enc("\nAre they the same?") + END
    answer = ASSISTANT + [13048, 0] + END  # "Hi!"
    assert enc("Hi!") == [13048, 0]
    expected["multi_image"] = (SYSTEM + user + answer, masked(SYSTEM) + masked(user) + answer)
    # an edit: A read with the instruction, B written
    user = USER + codes(A) + enc("\nMake it red.") + END
    answer = ASSISTANT + [TAG_START, S2] + codes(B) + [TAG_END] + END
    expected["ti2i"] = (SYSTEM + user + answer, masked(SYSTEM) + masked(user) + answer)
    # text only: "Say hi.\nPlease." has ".\n" as one token (624): masked, not a 198
    said = enc("user\nSay hi.\nPlease.")
    assert said == [872, NL, 45764, 15588, 624, 5501, 13]
    user = [IM_START] + said + END
    answer = ASSISTANT + [13048, 0] + END
    expected["text"] = (SYSTEM + user + answer, masked(SYSTEM) + masked(user) + answer)
    assert masked(user) == [IM_START, IGNORE, NL, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE, IM_END, NL]

    for as_json in (False, True):  # `conversations` as published (list of structs) or as a JSON string
        path = write_conversation_shard(tmp_path / f"conv-{as_json}.parquet",
                                        [{"conversations": c, "images": im} for c, im in rows.values()], facts,
                                        conversations_as_json=as_json)
        built = pq.read_table(path).to_pylist()
        b = _builder(fixture_tok)
        for task, row in zip(rows, built):
            ids, labels, got_task, skip = b.build(row, epoch=0)
            assert (got_task, skip) == (task, ""), task
            assert ids == expected[task][0], task
            assert labels == expected[task][1], task


def test_rows_are_checked_and_bad_ones_skipped_with_their_reason(fixture_tok, facts, tmp_path):
    b = _builder(fixture_tok)
    read = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}]
    good = {"conversations": read, "tatok_s3": [image(1)[3]]}
    assert b.build(good, 0)[2:] == ("i2t", "")
    cases = {
        "image_count_mismatch": [{**good, "tatok_s3": [image(1)[3], image(2)[3]]}, {**good, "tatok_s3": []}],
        "missing_codes": [{**good, "tatok_s3": None}, {"conversations": read}],
        "wrong_code_length": [{**good, "tatok_s3": [image(1)[3][:5]]}, {**good, "tatok_s3": [image(1)[1]]}],
        "codes_out_of_range": [{**good, "tatok_s3": [[512] + image(1)[3][1:]]}],
        "bad_conversation": [{"conversations": "{not json"}, {"conversations": [{"from": "human", "value": 3}]}],
    }
    for reason, rows in cases.items():
        for row in rows:
            assert b.build(row, 0)[3] == reason, (reason, row)
    # the image a written <image> is: an image to image row without words is i2i; a task of weight 0 is left out
    i2i = {"conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "<image>"}],
           "tatok_s3": [image(1)[3], image(2)[3]]}
    assert b.build(i2i, 0)[2:] == ("i2i", "")
    assert _builder(fixture_tok, task_mix={"i2t": 1, "i2i": 0}).build(i2i, 0)[2:] == ("i2i", "task_mix")
    # a plain conversation table with one image's codes as a flat list (what the trainer read before) still reads
    flat = {**good, "tatok_s3": image(1)[3]}
    assert b.build(flat, 0)[:2] == b.build(good, 0)[:2]


def test_the_mix_file_plan_and_draws(tmp_path):
    """The reference's data_demo.yaml parses as it is (sources named by number when names repeat); a source
    supplies rows x ratio share of the epoch (repeated or thinned); the draws are seeded, interleave the sources
    by the rows each still has, and a resume at any row replays them exactly."""
    from tarflow.preflight import Problems
    from tarflow.train.mix import MixSource, mixed_epoch_rows, plan_mix, read_mix_config

    (tmp_path / "demo.yaml").write_text(
        "datasets:\n  - json_path:\n    - /tmp/a/data\n    - /tmp/b\n    ratio: 2\n    name: 'parquet'\n"
        "  - json_path:\n    - /tmp/c\n    ratio: 4\n    name: 'parquet'\n  - paths: [s3://x/d]\n    name: text\n")
    problems = Problems()
    sources = read_mix_config(str(tmp_path / "demo.yaml"), problems)
    assert not problems.lines
    assert [(s.name, s.paths, s.ratio) for s in sources] == [
        ("parquet_1", ["/tmp/a/data", "/tmp/b"], 2.0), ("parquet_2", ["/tmp/c"], 4.0), ("text", ["s3://x/d"], 1.0)]
    (tmp_path / "bad.yaml").write_text("datasets:\n  - paths: [a]\n    ratio: -1\n  - ratio: 1\n")
    problems = Problems()
    read_mix_config(str(tmp_path / "bad.yaml"), problems)
    assert len(problems.lines) == 2 and any("ratio -1 is not a positive number" in x for x in problems.lines)

    # 100 + 10 + 50 rows, ratios 2 : 4 : 1: an epoch of 160 rows, 160 x 2/7 = 45.7 from the first (thinned),
    # 91.4 from the second (read 10 times, kept 0.914), 22.9 from the third
    sources = plan_mix([MixSource("a", [], 2, rows=100), MixSource("b", [], 4, rows=10),
                        MixSource("c", [], 1, rows=50)])
    assert [(s.copies, round(s.keep, 3)) for s in sources] == [(1, 0.457), (10, 0.914), (1, 0.457)]
    for s in sources:
        assert s.copies * s.keep * s.rows == pytest.approx(160 * s.ratio / 7)

    # the sources as files of several row groups (7 rows each): worker `rank` of 2 reads half of each
    for s in sources:
        s.files = []
        for f in range(2):
            path = tmp_path / f"{s.name}{f}.parquet"
            n = s.rows // 2 + (f if s.rows % 2 else 0)
            pq.write_table(pa.Table.from_pylist([{"key": f"{s.name}{f}.{k}"} for k in range(n)]), path,
                           row_group_size=7)
            s.files.append(str(path))
        s.file_rows = [pq.ParquetFile(f).metadata.num_rows for f in s.files]
        assert sum(s.file_rows) == s.rows

    def epoch(seed, skip, epoch=0, rank=0, shuffle=0):
        return [(pos, [(r["key"], r["_copy"]) for r in rows]) for pos, rows in mixed_epoch_rows(
            sources, seed, epoch, skip, rank=rank, world=2, read_rows=8, shuffle_buffer=shuffle)]

    full = epoch(0, 0)
    keys = [k for _, rows in full for k in rows]
    assert [p for p, _ in full] == list(range(0, len(keys), 8))
    both = keys + [k for _, rows in epoch(0, 0, rank=1) for k in rows]
    # every row of every source once per reading, over the two workers
    assert sorted(both) == sorted((f"{s.name}{f}.{k}", c) for s in sources for c in range(s.copies)
                                  for f, n in enumerate(s.file_rows) for k in range(n))
    assert epoch(0, 0) == full and epoch(1, 0) != full and epoch(0, 0, epoch=1) != full
    shuffled = epoch(0, 0, shuffle=16)
    assert shuffled != full and sorted(k for _, rows in shuffled for k in rows) == sorted(keys)
    # interleaved all along, by the rows each source has: every quarter of the epoch holds each source
    share = {s.name[0]: sum(k.startswith(s.name[0]) for k, _ in keys) / len(keys) for s in sources}
    for q in range(4):
        part = keys[q * len(keys) // 4:(q + 1) * len(keys) // 4]
        for n, x in share.items():
            assert abs(sum(k.startswith(n) for k, _ in part) / len(part) - x) < 0.15
    for skip in (1, 8, 37, len(keys) - 1):  # resumed at row `skip`: the rest of the same epoch
        rest = epoch(0, skip, shuffle=16)
        assert rest[0][0] == skip and [k for _, rows in rest for k in rows] == \
            [k for _, rows in shuffled for k in rows][skip:]


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    import tiny_tar

    return tiny_tar.save_tiny_base(tmp_path_factory.mktemp("base") / "qwen-tiny", hidden=32)


# the learning corpus: images 0-2 are edited into 3-5 ("Make it red."); pairs of 0-2 are named in order; 6-7 are
# generated from conversations; 8-9 are a caption code shard's (img2dataset path); one text-only chat
WORDS = ["cat", "dog", "sun"]
EDITS = [(0, 3), (1, 4), (2, 5)]
PAIRS = [(0, 1), (1, 0), (0, 2), (2, 1)]
T2I = {6: "A red kite in the sky.", 7: "Two boats on a lake."}
CAPTIONS = {8: "A green hill.", 9: "An old clock."}


def _learning_corpus(folder, facts, copies: int) -> str:
    """Four sources (conversation code shards and a caption code shard) and their mix file; each row `copies`
    times under distinct ids (each copy draws its own scale and task: Ray Data starts every epoch anew, which
    costs seconds, so few long epochs)."""
    import yaml
    from convshards import write_caption_shard

    folder.mkdir()
    edits = [{"id": f"e{k}-{c}", "conversations": [{"from": "human", "value": "<image>\nMake it red."},
                                                    {"from": "gpt", "value": "<image>"}],
              "images": [image(a), image(b)]} for c in range(copies) for k, (a, b) in enumerate(EDITS)]
    pairs = [{"id": f"p{k}-{c}", "conversations": [{"from": "human", "value": "<image>\n<image>\nWhat are they?"},
                                                   {"from": "gpt", "value": f"A {WORDS[a]} and a {WORDS[b]}."}],
              "images": [image(a), image(b)]} for c in range(copies) for k, (a, b) in enumerate(PAIRS)]
    t2i = [{"id": f"t{k}-{c}", "images": [image(k)],
            "conversations": [{"from": "human", "value": caption}, {"from": "gpt", "value": "<image>"}]}
           for c in range(copies) for k, caption in T2I.items()]
    t2i += [{"id": f"x{c}", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi!"}]}
            for c in range(copies)]
    for name, rows in (("edits", edits), ("pairs", pairs), ("t2i", t2i)):
        (folder / name).mkdir()
        write_conversation_shard(folder / name / "00000.parquet", rows, facts)
    (folder / "captions").mkdir()
    write_caption_shard(folder / "captions" / "00000.parquet",
                        [{"key": f"{k}-{c}", "caption": cap, "image": image(k)} for c in range(copies)
                         for k, cap in CAPTIONS.items()], facts)
    mix = {"datasets": [{"paths": [str(folder / "edits")], "ratio": 2, "name": "edits"},
                        {"paths": [str(folder / "pairs")], "ratio": 2, "name": "pairs"},
                        {"json_path": [str(folder / "t2i")], "ratio": 1, "name": "t2i"},
                        {"paths": [str(folder / "captions")], "ratio": 1, "name": "captions"}]}
    (folder / "mix.yaml").write_text(yaml.safe_dump(mix))
    return str(folder / "mix.yaml")


def _mix_cfg(mix, base_folder, facts, tmp_path, name, optim, **kw):
    from tarflow.train.mllm import MLLMTrainConfig

    kw = {"num_workers": 2, "shuffle_buffer": 16, "max_length": 256, **kw}
    return MLLMTrainConfig(data=[], data_config=mix, base=base_folder, tatok=facts.checkpoint, num_image_tokens=512,
                           scales=[3], task_mix={"i2t": 1, "t2i": 1, "text": 1},
                           questions=("Describe the image shortly.",), cpus_per_worker=0.5, checkpoint_every=1000,
                           log_every=20, storage_path=str(tmp_path / "runs"), name=name, optim=optim, **kw)


@pytest.mark.cluster  # minutes on 2 cores: the heavier group (make test-cluster)
def test_a_tiny_tar_learns_edits_two_image_questions_and_t2i_from_a_mixed_corpus(ray_local, base_folder, facts,
                                                                                  tmp_path):
    """Trained on the mix, a tiny Tar, decoding greedily with the bulk jobs' prompts, (a) writes image B's codes for the instruction and image A, (b) names both images of a pair in
    order, (c) draws each T2I conversation's image from its caption; the metrics count samples per task and
    per source."""
    from tarflow.models.generation import BatchedDecoder, Sampling
    from tarflow.models.mllm import i2t_prompt_ids, load_tar, parse_image_codes, t2i_prompt_ids
    from tarflow.train.common import OptimConfig
    from tarflow.train.mllm import run_train_mllm

    cfg = _mix_cfg(_learning_corpus(tmp_path / "corpus", facts, copies=60), base_folder, facts, tmp_path, "mix",
                   OptimConfig(lr=2e-2, total_steps=160, warmup_ratio=0.05))
    result = run_train_mllm(cfg)
    assert result.steps == 160
    m = result.metrics
    tasks = {t: m.get(f"total_samples_{t}", 0) for t in ("ti2i", "multi_image", "t2i", "i2t", "text")}
    sources = {s: m.get(f"total_source_{s}", 0) for s in ("edits", "pairs", "t2i", "captions")}
    assert min(tasks.values()) > 0 and min(sources.values()) > 0, (tasks, sources)
    # 2 : 2 : 1 : 1 by the mix (within the run's draws)
    assert sources["edits"] / sources["t2i"] == pytest.approx(2, rel=0.35), sources
    assert sources["pairs"] / sources["captions"] == pytest.approx(2, rel=0.35), sources
    assert "loss_ti2i" in str(result.history) and "loss_multi_image" in str(result.history)

    model, tok, vocab = load_tar(result.checkpoint)
    dec = BatchedDecoder(model, vocab.pad_id)
    greedy = Sampling(greedy=True)

    def codes(k):
        return image(k)[3]

    # (a) the edit: the answer is <im_start> <S2> B's codes <im_end>
    out = dec.generate([i2t_prompt_ids(tok, vocab, codes(a), "Make it red.") for a, _ in EDITS], 12, greedy,
                       stop_ids=(vocab.eos_id,))
    for (a, b), got in zip(EDITS, out.tokens):
        assert list(got[:12]) == [vocab.image_start_tag_id, vocab.scale_token_id(3)] + vocab.codes_to_ids(codes(b)) \
            + [vocab.image_end_tag_id], (a, b)

    # (b) two images in one question: the answer names both, in order
    def two_images(a, b):
        def tags(k):
            return "".join(f"<I{c}>" for c in codes(k))
        text = tok.apply_chat_template([{"role": "system", "content": "You are a helpful assistant."},
                                        {"role": "user", "content": f"{tags(a)}\n{tags(b)}\nWhat are they?"}],
                                       tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]

    out = dec.generate([two_images(a, b) for a, b in PAIRS], 16, greedy, stop_ids=(vocab.eos_id,))
    assert [tok.decode(g, skip_special_tokens=True).strip() for g in out.tokens] == \
        [f"A {WORDS[a]} and a {WORDS[b]}." for a, b in PAIRS]

    # (c) T2I learned from conversation rows, asked with the generate job's prompt
    out = dec.generate([t2i_prompt_ids(tok, vocab, caption, 3) for caption in T2I.values()], 9, greedy,
                       allowed_range=vocab.image_id_range)
    assert [parse_image_codes(g, vocab, 9)[0] for g in out.tokens] == [codes(k) for k in T2I]


def test_mix_file_problems_are_reported_together_before_ray_starts(base_folder, facts, tmp_path, capsys,
                                                                   monkeypatch):
    import importlib.util
    import os

    import tarflow.pipelines.runtime

    def no_ray(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(tarflow.pipelines.runtime, "init_ray", no_ray)
    spec = importlib.util.spec_from_file_location("train_mllm", os.path.join(os.path.dirname(__file__), "..", "jobs",
                                                                             "train_mllm.py"))
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    (tmp_path / "chats").mkdir()
    write_conversation_shard(tmp_path / "chats" / "00000.parquet",
                             [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ho"}]}],
                             facts)
    mix = tmp_path / "mix.yaml"
    mix.write_text(f"datasets:\n  - paths: [{tmp_path / 'none'}]\n    ratio: 2\n"
                   f"  - paths: [{tmp_path / 'chats'}]\n    ratio: 0\n")
    assert job.main(["--data-config", str(mix), "--base", base_folder, "--tatok", facts.checkpoint]) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"error: --data-config {mix}: source 2: ratio 0 is not a positive number; ")
    assert lines[1].startswith(f"error: --data-config source source_1: {tmp_path / 'none'}: not found")
    with pytest.raises(SystemExit):  # one of --data and --data-config
        job.parse_args(["--data", str(tmp_path / "chats"), "--data-config", str(mix)])
    assert "not both" in capsys.readouterr().err


@pytest.mark.cluster  # three Ray Train runs: run by `make test-cluster`
def test_a_mixed_run_stopped_and_resumed_reaches_the_straight_runs_weights(ray_local, base_folder, facts, tmp_path):
    """6 steps in one go and 2 + 4 steps (stopped mid-epoch, each worker's position in the mixed stream resumed by
    replaying its draws) give the same weights, with two workers, gradient accumulation and seeded shuffles."""
    import torch
    from safetensors.torch import load_file

    from tarflow.train.common import OptimConfig
    from tarflow.train.mllm import run_train_mllm

    mix = _learning_corpus(tmp_path / "corpus", facts, copies=4)
    optim = OptimConfig(lr=3e-3, total_steps=6, warmup_ratio=0.0, grad_accum=2)
    straight = run_train_mllm(_mix_cfg(mix, base_folder, facts, tmp_path, "straight", optim, max_length=128))
    cfg = _mix_cfg(mix, base_folder, facts, tmp_path, "split", optim, max_length=128)
    cfg.stop_at_step = 2
    assert run_train_mllm(cfg).steps == 2
    cfg.stop_at_step = None
    split = run_train_mllm(cfg)
    assert split.starts == [0, 2] and split.steps == 6
    assert [m["epoch"] for m in split.history] == [m["epoch"] for m in straight.history]
    for key in ("total_source_edits", "total_source_pairs", "total_samples_ti2i", "total_samples_multi_image"):
        assert split.metrics[key] == straight.metrics[key], key
    wa, wb = (load_file(f"{r.checkpoint}/model.safetensors") for r in (straight, split))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


def test_conversation_code_shards_pass_the_drivers_checks_and_are_counted(facts, tmp_path):
    """Their footers are a conversation code shard's (the TA-Tok's facts read from them), and rows with an
    <image> are told from text-only ones whichever form `conversations` has (for the task mix's text share)."""
    from tarflow.data import schema
    from tarflow.train.footers import read_footers
    from tarflow.train.mllm import count_row_kinds, data_facts

    rows = [{"conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}],
             "images": [image(1)]},
            {"conversations": [{"from": "human", "value": "Hi."}, {"from": "gpt", "value": "Ho."}]}]
    files = [write_conversation_shard(tmp_path / f"{k}.parquet", rows, facts, conversations_as_json=bool(k))
             for k in range(2)]
    footers = read_footers(files, check=schema.check_any_code_shard)
    assert all(f.meta and not f.error for f in footers)
    got = data_facts(footers)
    assert (got["tokens_per_scale"], got["codebook_size"]) == (TOKENS, 512)
    assert got["tatok_sha256"] == facts.checkpoint_sha256
    assert count_row_kinds(footers) == {"caption": 0, "image_chat": 2, "text": 2}
