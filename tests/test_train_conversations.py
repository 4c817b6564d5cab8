"""The MLLM trainer on Tar's own corpora: conversations with images read and written, any number per row, and
the reference's data mix (tarflow.train.mix). Corpora are conversation code shards written by tests/convshards.py."""
from __future__ import annotations

import gzip
import json

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

    SYSTEM = [IM_START, 8948, NL, 2610, 525, 264, 10950, 17847, 13, IM_END, NL]  # "system\nYou are a helpful assistant."
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
