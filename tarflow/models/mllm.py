"""The Tar MLLM: Qwen2 with Tar's image vocabulary, the reference's prompts, and checkpoint loading.

Tar is a plain Qwen2ForCausalLM whose vocabulary gained, after Qwen2.5's 151,665 tokens and in this order:

    <im_start> <im_end>            special, 151665 151666     (wrap a generated image)
    <S0> <S1> <S2>                 151667..151669             (pool scale s -> <S{s-1}>)
    <I0> .. <I65535>               151670..217205             (TA-Tok code c -> 151670 + c)

There is no projector: image tokens are ordinary embedding rows. The prompts below reproduce, id for id, what
the reference's `i2t_inference.py` / `t2i_inference.py` feed the LLM (checked against
../shared/fixtures/reference/mllm in tests/test_mllm.py).
"""
from __future__ import annotations

import logging
import os
import re
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from tarflow.data import storage
from tarflow.models.checkpoint import CheckpointError

log = logging.getLogger(__name__)

IMAGE_START_TAG = "<im_start>"
IMAGE_END_TAG = "<im_end>"
SCALE_TOKEN = "<S{}>"  # the reference's train.py defaults
IMAGE_TOKEN = "<I{}>"
CHAT_EOS = "<|im_end|>"  # ends every chat turn; generation stops on it
DEFAULT_SYSTEM = "You are a helpful assistant."
NUM_SCALE_TOKENS = 3  # scripts/Tar_1.5B_pretrain_demo.sh: --num_scale_tokens 3 --num_image_tokens 65536
NUM_IMAGE_TOKENS = 65536

_IMAGE_CODE_RE = re.compile(r"<I(\d+)>")  # what the reference parses generated images with


# ----------------------------------------------------------------------------------------------------------
# Vocabulary


@dataclass(frozen=True)
class TarVocab:
    """Token ids of Tar's additions to a Qwen2 tokenizer, plus the chat's eos and pad ids."""

    image_start_tag_id: int  # <im_start>
    image_end_tag_id: int  # <im_end>
    scale_token_ids: tuple[int, ...]  # <S0>, <S1>, ...
    image_base_id: int  # <I0>; code c is image_base_id + c
    num_image_tokens: int
    eos_id: int  # <|im_end|>, the end of a chat turn
    pad_id: int
    vocab_size: int  # len(tokenizer)

    @classmethod
    def from_tokenizer(cls, tokenizer, num_image_tokens: int | None = None) -> TarVocab:
        """Read the ids off `tokenizer` and check that Tar's tokens are there, contiguous and in order.

        `num_image_tokens` defaults to however many `<I{k}>` tokens the tokenizer holds (65536 for Tar).
        """
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        fix = ("add them with tarflow.models.mllm.add_tar_tokens(tokenizer), or load the tokenizer saved with a Tar "
               "model")
        added = tokenizer.get_added_vocab()  # {token: id}; Tar's tokens are all added tokens
        missing = [t for t in (IMAGE_START_TAG, IMAGE_END_TAG, SCALE_TOKEN.format(0), IMAGE_TOKEN.format(0))
                   if t not in added]
        if missing:
            raise ValueError(f"tokenizer {name!r} lacks Tar's tokens {missing}; {fix}")

        n_scale = sum(1 for t in added if re.fullmatch(r"<S\d+>", t))
        if num_image_tokens is None:
            num_image_tokens = sum(1 for t in added if _IMAGE_CODE_RE.fullmatch(t))
        names = ([IMAGE_START_TAG, IMAGE_END_TAG] + [SCALE_TOKEN.format(i) for i in range(n_scale)]
                 + [IMAGE_TOKEN.format(i) for i in range(num_image_tokens)])
        first = added[IMAGE_START_TAG]
        bad = [(t, added.get(t), first + i) for i, t in enumerate(names) if added.get(t) != first + i]
        if bad:
            t, got, want = bad[0]
            raise ValueError(
                f"tokenizer {name!r}: Tar's tokens are not contiguous and in order ({len(bad)} misplaced; e.g. "
                f"{t} has id {got}, expected {want}). Their order is fixed by the checkpoints: <im_start>, "
                f"<im_end>, <S0>..<S{n_scale - 1}>, <I0>..<I{num_image_tokens - 1}>; rebuild the tokenizer with "
                f"add_tar_tokens on a fresh Qwen2 tokenizer"
            )
        eos = tokenizer.convert_tokens_to_ids(CHAT_EOS)
        if eos is None or eos == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer {name!r} has no {CHAT_EOS} token; Tar needs a Qwen2 chat tokenizer")
        pad = tokenizer.pad_token_id
        if pad is None:  # Qwen2.5 pads with <|endoftext|>
            pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        return cls(
            image_start_tag_id=first,
            image_end_tag_id=first + 1,
            scale_token_ids=tuple(range(first + 2, first + 2 + n_scale)),
            image_base_id=first + 2 + n_scale,
            num_image_tokens=num_image_tokens,
            eos_id=int(eos),
            pad_id=int(pad),
            vocab_size=len(tokenizer),
        )

    # --- codes <-> ids

    def code_to_id(self, code: int) -> int:
        code = int(code)
        if not 0 <= code < self.num_image_tokens:
            raise ValueError(f"image code {code} outside [0, {self.num_image_tokens})")
        return self.image_base_id + code

    def codes_to_ids(self, codes: Iterable[int] | torch.Tensor) -> list[int]:
        codes = _as_int_list(codes)
        if codes and not (0 <= min(codes) and max(codes) < self.num_image_tokens):
            raise ValueError(f"image codes must lie in [0, {self.num_image_tokens}); got [{min(codes)}, {max(codes)}]")
        return [self.image_base_id + c for c in codes]

    def ids_to_codes(self, ids: Iterable[int] | torch.Tensor) -> list[int]:
        """Image-token ids -> codes; any other id is an error (use parse_image_codes for raw generations)."""
        ids = _as_int_list(ids)
        start, stop = self.image_id_range
        bad = [i for i in ids if not start <= i < stop]
        if bad:
            raise ValueError(f"{len(bad)} ids are not image tokens (e.g. {bad[:3]}); image ids are [{start}, {stop})")
        return [i - start for i in ids]

    def scale_token_id(self, pool_scale: int) -> int:
        """Pool scale s (1 -> 729 tokens, 2 -> 169, 3 -> 81) -> id of <S{s-1}>."""
        if not 1 <= int(pool_scale) <= len(self.scale_token_ids):
            raise ValueError(f"pool scale {pool_scale} has no scale token; Tar knows scales "
                             f"1..{len(self.scale_token_ids)}")
        return self.scale_token_ids[int(pool_scale) - 1]

    def is_image_id(self, token_id):
        """True where `token_id` (an int or a tensor of ids) is an image token."""
        start, stop = self.image_id_range
        if isinstance(token_id, torch.Tensor):
            return (token_id >= start) & (token_id < stop)
        return start <= int(token_id) < stop

    @property
    def image_id_range(self) -> tuple[int, int]:
        """(start, stop) of the image ids, e.g. for masking logits to image tokens: logits[..., start:stop]."""
        return self.image_base_id, self.image_base_id + self.num_image_tokens


def _as_int_list(x) -> list[int]:
    if isinstance(x, torch.Tensor):
        if x.dim() != 1:
            raise ValueError(f"expected a 1-D sequence of ids/codes, got a tensor of shape {tuple(x.shape)}")
        return [int(v) for v in x.tolist()]
    if hasattr(x, "tolist"):  # numpy
        x = x.tolist()
    return [int(v) for v in x]


def add_tar_tokens(tokenizer, num_scale_tokens: int = NUM_SCALE_TOKENS,
                   num_image_tokens: int = NUM_IMAGE_TOKENS) -> TarVocab:
    """Add Tar's tokens to a Qwen2 tokenizer in the reference's order, in place; return the ids.

    Order and flags as the reference's `initialize_vision_tokenizer`: `<im_start>`, `<im_end>` as special tokens,
    then `<S0>`..`<S{n-1}>`, then `<I0>`..`<I{K-1}>` as ordinary added tokens. Each group goes in one `add_tokens`
    call: all 65,536 image tokens take ~0.2 s that way, while one call per token gets slower with every token
    (tens of minutes in all). A tokenizer that already has them is checked and left alone; one that has only
    some of them is an error, since the ids would then differ from every Tar checkpoint's.
    """
    added = tokenizer.get_added_vocab()
    if IMAGE_START_TAG in added:
        vocab = TarVocab.from_tokenizer(tokenizer)
        have = (len(vocab.scale_token_ids), vocab.num_image_tokens)
        if have != (num_scale_tokens, num_image_tokens):
            raise ValueError(
                f"tokenizer already has Tar's tokens, but {have[0]} scale and {have[1]} image tokens instead of "
                f"{num_scale_tokens} and {num_image_tokens}; start again from a tokenizer without Tar's tokens"
            )
        return vocab
    n0 = len(tokenizer)
    names = ([SCALE_TOKEN.format(i) for i in range(num_scale_tokens)]
             + [IMAGE_TOKEN.format(i) for i in range(num_image_tokens)])
    clash = [t for t in added if t == IMAGE_END_TAG or re.fullmatch(r"<[SI]\d+>", t)]
    if clash:
        raise ValueError(f"tokenizer has some of Tar's tokens but not <im_start> (e.g. {clash[:3]}); start again "
                         f"from a tokenizer without Tar's tokens")
    tokenizer.add_tokens([IMAGE_START_TAG, IMAGE_END_TAG], special_tokens=True)
    tokenizer.add_tokens(names[:num_scale_tokens], special_tokens=False)
    tokenizer.add_tokens(names[num_scale_tokens:], special_tokens=False)
    vocab = TarVocab.from_tokenizer(tokenizer, num_image_tokens=num_image_tokens)
    # new tokens are numbered from len(tokenizer); anywhere else (or fewer of them: add_tokens skips strings the
    # base vocabulary already has) would give ids that no Tar checkpoint uses
    if vocab.image_start_tag_id != n0 or vocab.vocab_size != n0 + 2 + len(names):
        raise ValueError(f"Tar's tokens landed at {vocab.image_start_tag_id}..{vocab.vocab_size - 1} instead of "
                         f"{n0}..{n0 + 1 + len(names)}; the tokenizer's vocabulary has holes or already has some of "
                         f"Tar's token strings")
    return vocab


# ----------------------------------------------------------------------------------------------------------
# Prompts

_MARK = "\x00tarflow-image\x00"  # stands in for the image tokens while the chat template is rendered
_i2t_checked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _messages(user: str, system: str | None) -> list[dict]:
    msgs = [] if system is None else [{"role": "system", "content": system}]
    return msgs + [{"role": "user", "content": user}]


def _encode(tokenizer, text: str) -> list[int]:
    # the chat template already wrote every marker token; Qwen2 adds no BOS either way
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _render(tokenizer, messages: list[dict]) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; Tar's prompts "
                         f"are Qwen2.5 chats (load the tokenizer saved with the Tar model)")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def i2t_prompt_ids(tokenizer, vocab: TarVocab, codes, question: str, system: str | None = DEFAULT_SYSTEM,
                   verify: bool = False) -> list[int]:
    """Input ids of an image-to-text prompt, exactly as the reference builds them.

    Chat template with the user turn = image tokens + "\\n" + question, then the generation prompt; the image is
    not wrapped in <im_start>/<im_end> and has no scale token. The image part is written as ids directly
    (code c -> image_base_id + c) and only the text around it is tokenized, which is what tokenizing the
    rendered `<I..>` text gives, since added tokens split the text before BPE runs. That equality is checked on
    the first call per tokenizer, and on every call with `verify=True`. `system=None` leaves the system turn to
    the template (Qwen2.5's default is the same text).
    """
    codes = _as_int_list(codes)
    image_ids = vocab.codes_to_ids(codes)
    text = _render(tokenizer, _messages(_MARK + "\n" + question, system))
    if text.count(_MARK) != 1:
        raise ValueError("the chat template rendered the user turn more than once or not at all; cannot place "
                         "the image tokens")
    before, after = text.split(_MARK)
    if not image_ids:
        # nothing separates the two texts: "\n" around the gap would merge into one token
        return _encode(tokenizer, before + after)
    ids = _encode(tokenizer, before) + image_ids + _encode(tokenizer, after)
    if verify or tokenizer not in _i2t_checked:
        full = _encode(tokenizer, before + "".join(IMAGE_TOKEN.format(c) for c in codes) + after)
        if full != ids:
            raise ValueError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r}: image ids written directly differ from "
                f"tokenizing the rendered prompt (first difference at position "
                f"{next(i for i, (a, b) in enumerate(zip(full + [None], ids + [None])) if a != b)}); are the <I..> "
                f"tokens added tokens of this tokenizer?"
            )
        _i2t_checked[tokenizer] = True
    return ids


def t2i_prompt_ids(tokenizer, vocab: TarVocab, prompt: str, pool_scale: int,
                   system: str | None = DEFAULT_SYSTEM) -> list[int]:
    """Input ids of a text-to-image prompt: the chat with its generation prompt, then `<im_start><S{s-1}>`."""
    text = _render(tokenizer, _messages(prompt, system))
    return _encode(tokenizer, text) + [vocab.image_start_tag_id, vocab.scale_token_id(pool_scale)]


IMAGE_MARK = "<image>"  # LLaVA's placeholder: one per image, in order over every turn
HUMAN_ROLES = ("human", "user")


class ConversationError(ValueError):
    """A conversation that cannot become a prompt; `reason` is a short stable tag for errors/."""

    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


def count_image_marks(turns) -> int:
    return sum((value or "").count(IMAGE_MARK) for _, value in turns)


def instruction_turn(prompt: str | None, num_images: int) -> str:
    """The human turn of a row with input images: `<image>` marks in the prompt place the images; without
    marks the images come first, then "\n" + prompt (the I2T layout); no prompt: the images alone."""
    prompt = prompt or ""
    if IMAGE_MARK in prompt or not num_images:
        return prompt
    return IMAGE_MARK * num_images + ("\n" + prompt if prompt.strip() else "")


def turn_ids(tokenizer, role: str, parts) -> list[int]:
    """`<|im_start|>{role}\n` parts `<|im_end|>\n`, `parts` = strings (tokenized one by one) and id lists
    (image tokens, in place): the layout tarflow.train.mllm.SampleBuilder trains on, piece by piece."""
    start, end = tokenizer.convert_tokens_to_ids("<|im_start|>"), tokenizer.convert_tokens_to_ids(CHAT_EOS)
    ids = [start] + _encode(tokenizer, f"{role}\n")
    for part in parts:
        ids += _encode(tokenizer, part) if isinstance(part, str) else list(part)
    return ids + [end] + _encode(tokenizer, "\n")


def conversation_prompt_ids(tokenizer, vocab: TarVocab, turns, images, scale: int | None, *,
                            answer_image: bool = False, system: str = DEFAULT_SYSTEM) -> list[int]:
    """Input ids of a conversation up to the model's answer, as Tar is trained on it (the reference's rules).

    `turns`: (from, value) pairs in order, `from` human/user or gpt/assistant; `images`: one code list per
    `<image>` mark, counting every turn in order. A mark in a human turn becomes that image's codes in place
    (no wrapper, no scale token: images the model reads); in a gpt turn, `<im_start><S{scale-1}>` codes
    `<im_end>` (an image the model wrote). Then the assistant's turn is opened; with `answer_image` it goes on
    with `<im_start><S{scale-1}>`, so that what follows is an image at `scale` (as the T2I prompt).
    ConversationError when the marks and the images differ in number."""
    images = [vocab.codes_to_ids(c) for c in images]
    marks = count_image_marks(turns)
    if marks != len(images):
        raise ConversationError("image_count_mismatch", f"{marks} {IMAGE_MARK} marks for {len(images)} images")
    ids = turn_ids(tokenizer, "system", [system])
    k = 0
    for who, value in turns:
        human = who in HUMAN_ROLES
        parts = []
        for j, piece in enumerate((value or "").split(IMAGE_MARK)):
            if j:
                img = images[k]
                k += 1
                parts.append(img if human else [vocab.image_start_tag_id, vocab.scale_token_id(scale)] + img
                             + [vocab.image_end_tag_id])
            if piece:
                parts.append(piece)
        ids += turn_ids(tokenizer, "user" if human else "assistant", parts)
    ids += [tokenizer.convert_tokens_to_ids("<|im_start|>")] + _encode(tokenizer, "assistant\n")
    if answer_image:
        ids += [vocab.image_start_tag_id, vocab.scale_token_id(scale)]
    return ids


def edit_prompt_ids(tokenizer, vocab: TarVocab, prompt: str | None, images, scale: int,
                    system: str = DEFAULT_SYSTEM) -> list[int]:
    """Text + image(s) to image (edits, variations): one human turn = the images' codes and the instruction
    (`instruction_turn`), then `<im_start><S{scale-1}>` for the image to write."""
    return conversation_prompt_ids(tokenizer, vocab, [("human", instruction_turn(prompt, len(images)))], images,
                                   scale, answer_image=True, system=system)


def parse_image_codes(generated_ids, vocab: TarVocab, n_tokens: int, tokenizer=None) -> tuple[list[int], str]:
    """Codes of a generated image, cut or zero-padded to `n_tokens`; returns (codes, "ok"|"truncated"|"padded").

    The reference decodes ALL generated ids to text, takes every `<I(\\d+)>` in order, keeps the first n and
    pads with code 0. Without `tokenizer` the image-token ids are taken directly, which is the same except when
    ordinary text tokens happen to spell `<I123>`; pass `tokenizer` to parse the decoded text exactly as the
    reference does (codes out of the codebook's range, which only text can spell, are dropped: the
    reference would fail on them in the de-tokenizer).
    """
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    ids = _as_int_list(generated_ids)
    if tokenizer is None:
        codes = [i - vocab.image_base_id for i in ids if vocab.is_image_id(i)]
    else:
        text = tokenizer.decode(ids, skip_special_tokens=False)
        codes = [c for c in (int(m) for m in _IMAGE_CODE_RE.findall(text)) if c < vocab.num_image_tokens]
    if len(codes) > n_tokens:
        return codes[:n_tokens], "truncated"
    if len(codes) < n_tokens:
        return codes + [0] * (n_tokens - len(codes)), "padded"
    return codes, "ok"


# ----------------------------------------------------------------------------------------------------------
# Checkpoints

# files a Hugging Face model folder needs for inference; training state (optimizer.pt, rng_state_*.pth, ...) is
# left behind, and pickled weights (*.bin) are not read at all
_MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".txt", ".jinja", ".model")


def default_cache_dir() -> Path:
    """Where remote Tar folders are copied: $TARFLOW_HOME/cache/mllm (default ~/.cache/tarflow/cache/mllm)."""
    return storage.tarflow_home() / "cache" / "mllm"


def fetch_model_folder(url: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Copy the top-level model files of the folder at `url` (s3://...) to a local cache folder and return it
    (reused while the remote files are unchanged; see storage.cached_folder_copy)."""
    try:
        return storage.cached_folder_copy(url, cache_dir or default_cache_dir(), maxdepth=1,
                                          keep=lambda rel: "/" not in rel and rel.endswith(_MODEL_FILE_SUFFIXES))
    except FileNotFoundError:
        raise CheckpointError(url, "no model files found there (config.json, *.safetensors, tokenizer files)",
                              "check the URL and the AWS_* credentials / AWS_ENDPOINT_URL") from None


def tokenizer_kwargs() -> dict:
    """Extra AutoTokenizer.from_pretrained arguments for Tar / Qwen2 folders under this transformers.

    transformers 4.57.3..4.x mistakes any folder saved by those releases for a Mistral one and warns that its
    (Qwen2) split regex is wrong: fix_mistral_regex=False keeps the regex as saved and the log quiet. 5.x tells
    Qwen2 folders apart by model_type, and 5.0 raises a TypeError when the flag is passed at all.
    """
    import transformers

    return {"fix_mistral_regex": False} if int(transformers.__version__.split(".")[0]) < 5 else {}


def load_tar(path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
             cache_dir: str | os.PathLike | None = None):
    """Load a Tar checkpoint folder (Qwen2ForCausalLM + its tokenizer): returns (model, tokenizer, vocab).

    `path` is a local folder or an s3:// (any fsspec) URL, which is first copied to a local cache (see
    fetch_model_folder). Only safetensors weights are read, and nothing is ever fetched from the Hugging Face
    hub. The model is returned in eval mode.
    """
    from transformers import AutoConfig, AutoTokenizer, Qwen2ForCausalLM

    source = str(path)
    if storage.is_remote(source):
        folder = fetch_model_folder(source, cache_dir)
    else:
        folder = Path(source.removeprefix("file://"))
        if not folder.exists():
            raise CheckpointError(source, "folder not found", "check the path")
        if not folder.is_dir():
            raise CheckpointError(source, "is a file, not a model folder",
                                  "pass the folder holding config.json, the *.safetensors weights and the tokenizer")

    if not (folder / "config.json").is_file():
        raise CheckpointError(source, "no config.json: not a Hugging Face model folder",
                              "save the model with model.save_pretrained(folder)")
    if not any(folder.glob("*.safetensors")):
        hint = " (found pickled *.bin weights, which tarflow does not unpickle)" if any(folder.glob("*.bin")) else ""
        raise CheckpointError(source, f"no *.safetensors weights{hint}",
                              "re-save the model with save_pretrained(folder, safe_serialization=True)")
    if not ((folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()):
        raise CheckpointError(source, "no tokenizer files (tokenizer.json / tokenizer_config.json)",
                              "save Tar's tokenizer into the same folder with tokenizer.save_pretrained(folder)")

    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # JSON, key and value errors alike: all mean a broken config.json
        raise CheckpointError(source, f"config.json does not load ({type(e).__name__}: {e})") from None
    if config.model_type != "qwen2":
        raise CheckpointError(source, f"config.json describes a {config.model_type!r} model, not 'qwen2'",
                              "Tar checkpoints are Qwen2ForCausalLM folders")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **tokenizer_kwargs())
    except Exception as e:  # the tokenizers library and transformers raise many kinds; all mean broken files
        raise CheckpointError(source, f"its tokenizer does not load ({type(e).__name__}: {e})") from None
    try:
        vocab = TarVocab.from_tokenizer(tokenizer)
    except ValueError as e:
        raise CheckpointError(source, f"its tokenizer is not Tar's: {e}") from None
    if config.vocab_size < len(tokenizer):
        raise CheckpointError(
            source, f"the model has {config.vocab_size} embedding rows but the tokenizer {len(tokenizer)} tokens",
            "model and tokenizer belong to different checkpoints; resize with new_tar_model before saving",
        )
    # Tar's configs record the ids they were trained with; they must be the tokenizer's
    expected = {"image_start_tag_id": vocab.image_start_tag_id, "image_end_tag_id": vocab.image_end_tag_id,
                "image_start_token_id": vocab.image_base_id,
                "image_end_token_id": vocab.image_base_id + vocab.num_image_tokens - 1}
    wrong = {k: (getattr(config, k), v) for k, v in expected.items()
             if getattr(config, k, None) is not None and getattr(config, k) != v}
    if wrong:
        raise CheckpointError(source, f"config.json and the tokenizer disagree on Tar's ids (config, tokenizer): "
                                      f"{wrong}", "model and tokenizer belong to different checkpoints")

    try:
        model = Qwen2ForCausalLM.from_pretrained(folder, config=config, dtype=dtype, local_files_only=True,
                                                 use_safetensors=True)
    except Exception as e:  # safetensors, torch and transformers raise many kinds; all mean broken files
        raise CheckpointError(source, f"the weights do not load ({type(e).__name__}: {str(e).splitlines()[0]})",
                              "the files are damaged or incomplete; fetch them again") from None
    return model.to(device).eval(), tokenizer, vocab


def new_tar_model(base_model, tokenizer, codebook: torch.Tensor | None = None):
    """Resize a base Qwen2 model's embeddings for Tar's vocabulary (after add_tar_tokens); returns the model.

    As the reference: every row from <im_start> on gets the mean of the rows before it (the base vocabulary's),
    except that the image-token rows are the TA-Tok codebook (K x D, e.g. TATok's `bottleneck.regularizer
    .codebook()`) when D equals the hidden size. An untied lm_head gets its new rows the same way from its own
    rows; a tied one shares the input embeddings. Rows a Qwen2.5 checkpoint keeps as padding past its
    151,665 tokens are overwritten, since Tar's ids start there.
    """
    vocab = TarVocab.from_tokenizer(tokenizer)
    first, n = vocab.image_start_tag_id, len(tokenizer)
    emb = base_model.get_input_embeddings().weight
    if emb.shape[0] < first:
        raise ValueError(f"the base model has {emb.shape[0]} embedding rows but Tar's tokens start at {first}; "
                         f"is the tokenizer the base model's?")
    hidden = emb.shape[1]
    if codebook is not None:
        if codebook.dim() != 2 or codebook.shape[0] != vocab.num_image_tokens:
            raise ValueError(f"codebook must be ({vocab.num_image_tokens}, D), one row per image token; "
                             f"got {tuple(codebook.shape)}")
        if codebook.shape[1] != hidden:
            log.info("codebook width %d != hidden size %d: image rows start from the mean embedding",
                     codebook.shape[1], hidden)
            codebook = None

    out = base_model.get_output_embeddings()
    tied = out is None or out.weight is emb or out.weight.data_ptr() == emb.data_ptr()
    with torch.no_grad():
        mean_in = emb[:first].float().mean(0)
        mean_out = None if tied else out.weight[:first].float().mean(0)
    # mean_resizing=False: the new rows are all overwritten below, so skip HF's covariance-based init
    base_model.resize_token_embeddings(n, mean_resizing=False)

    targets = [(base_model.get_input_embeddings().weight, mean_in)]
    if not tied:
        targets.append((base_model.get_output_embeddings().weight, mean_out))
    start, stop = vocab.image_id_range
    with torch.no_grad():
        for w, mean in targets:
            w[first:] = mean.to(w.dtype)
            if codebook is not None:
                w[start:stop] = codebook.to(device=w.device, dtype=w.dtype)
    # record the ids as the reference's configs do, so a saved model says which vocabulary it was trained with
    base_model.config.update({"image_start_tag_id": vocab.image_start_tag_id,
                              "image_end_tag_id": vocab.image_end_tag_id,
                              "scale_start_token_id": vocab.scale_token_ids[0],
                              "scale_end_token_id": vocab.scale_token_ids[-1],
                              "image_start_token_id": start, "image_end_token_id": stop - 1})
    return base_model
