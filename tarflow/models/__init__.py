"""The Tar model family in plain PyTorch: TA-Tok, the de-tokenizers, the MLLM vocabulary and prompts."""


def detokenize(*args, **kwargs):
    """TA-Tok codes -> uint8 images through the AR de-tokenizer (see tarflow.models.detokenize)."""
    from tarflow.models.detokenize import detokenize as _detokenize

    return _detokenize(*args, **kwargs)
