"""TA-Tok codes -> pixels end to end: the reference MMAutoEncoder fixture reproduced."""
from __future__ import annotations

import pytest
import torch
from conftest import reference_fixture

from tarflow.models import detokenize
from tarflow.models.ar_detok import ARDetokenizer
from tarflow.models.detokenize import ARImageDecoder, ARSampling
from tarflow.models.tatok import TATok
from tarflow.models.vqvae import VQVAE


@pytest.fixture(scope="module")
def parts():
    from safetensors.torch import load_file

    d = reference_fixture("mm_autoencoder")
    root = d.parent
    return (TATok.from_checkpoint(str(root / "ta_tok" / "ta_tok.pth")),
            ARDetokenizer.from_checkpoint(str(root / "ar_dtok" / "ar_dtok.pth")),
            VQVAE.from_checkpoint(str(root / "vqvae" / "vq.pt")),
            load_file(str(d / "inputs.safetensors")), load_file(str(d / "outputs.safetensors")),
            load_file(str(root / "ta_tok" / "inputs.safetensors"))["pixel_values"])


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_codes_to_pixels_match_the_reference(parts, cfg):
    tatok, ar, vq, inp, out, _ = parts
    images = detokenize(inp["indices"], tatok, ar, vq, cfg_scale=cfg, top_k=1)
    want = out[f"decode_from_encoder_indices.cfg{cfg:.0f}"]
    assert images.dtype == torch.uint8 and images.shape == want.shape == (4, 64, 64, 3)
    diff = (images.int() - want.int()).abs()
    assert int(diff.max()) <= 1 and float((diff == 0).float().mean()) > 0.99


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_image_to_image_round_trip_matches_the_reference(parts, cfg):
    """Image -> TA-Tok codes -> AR tokens: the reference's forward picks the same AR tokens here."""
    tatok, ar, vq, inp, out, pixels = parts
    codes = tatok.encode(pixels, 1)
    assert torch.equal(codes, inp["indices"])
    dec = ARImageDecoder(tatok, ar, vq)
    tokens = dec.vq_tokens(codes, ARSampling(cfg_scale=cfg, top_k=1))
    assert torch.equal(tokens, out[f"forward.cfg{cfg:.0f}.ar_tokens"])


def test_mismatched_parts_are_refused(parts):
    tatok, ar, vq, *_ = parts
    wide = ARDetokenizer.from_checkpoint(ar.path)
    wide.args.cond_dim = 1152
    with pytest.raises(ValueError, match="1152-wide"):
        ARImageDecoder(tatok, wide, vq)
