"""Pixel VQ (LlamaGen VQ-16 family): parity with the reference's decoded images, width inference, bad checkpoints."""
from __future__ import annotations

import io
import json

import pytest
import torch
from conftest import reference_fixture

from tarflow.models.checkpoint import CheckpointError
from tarflow.models.vqvae import VQConfig, VQVAE, config_from_state_dict

SETS = ["greedy_cfg1", "greedy_cfg4"]


@pytest.fixture(scope="module")
def ref():
    from safetensors.torch import load_file

    d = reference_fixture("vqvae")
    return d, load_file(str(d / "outputs.safetensors"))


@pytest.fixture(scope="module")
def model(ref):
    return VQVAE.from_checkpoint(str(ref[0] / "vq.pt"))


def _sd(ref):
    return torch.load(str(ref[0] / "vq.pt"), map_location="cpu", weights_only=True)["model"]


def _save(tmp_path, name, obj):
    p = tmp_path / name
    torch.save(obj, p)
    return str(p)


# -- parity -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("s", SETS)
def test_decode_matches_reference(ref, model, s):
    _, out = ref
    img = model.decode_code(out[f"{s}.tokens"])
    assert img.shape == (4, 3, 64, 64) and img.dtype == torch.float32
    torch.testing.assert_close(img, out[f"{s}.decode_from_bottleneck"], atol=1e-4, rtol=1e-4)
    assert img.min() < 0 and img.max() > 1  # not clamped, like the reference's decode_from_bottleneck


@pytest.mark.parametrize("s", SETS)
def test_uint8_post_process_matches_reference(ref, model, s):
    _, out = ref
    u = VQVAE.to_uint8(model.decode_code(out[f"{s}.tokens"]))
    expected = out[f"{s}.post_process"]
    assert u.shape == expected.shape == (4, 64, 64, 3) and u.dtype == torch.uint8
    diff = (u.int() - expected.int()).abs()
    # truncation turns float noise at an integer boundary into a 1-level step, nothing more
    assert int(diff.max()) <= 1
    assert (diff == 0).float().mean() > 0.999


def test_token_grid_forms_and_batching_agree(ref, model):
    _, out = ref
    t = out["greedy_cfg4.tokens"]
    flat = model.decode_code(t)
    assert torch.equal(model.decode_code(t.reshape(4, 4, 4)), flat)
    single = torch.cat([model.decode_code(t[i:i + 1]) for i in range(len(t))])
    torch.testing.assert_close(single, flat, atol=1e-5, rtol=1e-5)


def test_loaded_model_properties(ref, model):
    d, _ = ref
    meta = json.loads((d / "meta.json").read_text())
    assert model.path == str(d / "vq.pt") and model.sha256 == meta["sha256"]["vq.pt"]
    assert not model.training
    cfg = meta["vq_config"]
    assert (model.cfg.ch, list(model.cfg.ch_mult), model.cfg.z_channels) == (cfg["ch"], cfg["ch_mult"], cfg["z_channels"])
    assert (model.codebook_size, model.cfg.codebook_dim) == (cfg["codebook_size"], cfg["codebook_embed_dim"])
    assert model.downsample == 16 and model.cfg.num_res_blocks == 2
    assert model.quantize.codebook_used.shape == (65536,)
    assert sum(p.numel() for p in model.parameters()) == meta["vq_params"]
    assert set(model.state_dict()) == set(meta["state_dict_keys"])


def test_loads_without_codebook_usage_buffer(ref, model, tmp_path):
    _, out = ref
    sd = _sd(ref)
    del sd["quantize.codebook_used"]
    m = VQVAE.from_checkpoint(_save(tmp_path, "nousage.pt", {"model": sd}))
    assert not hasattr(m.quantize, "codebook_used")
    t = out["greedy_cfg1.tokens"]
    assert torch.equal(m.decode_code(t), model.decode_code(t))


def test_bfloat16_runs_and_stays_close(ref):
    d, out = ref
    m = VQVAE.from_checkpoint(str(d / "vq.pt")).to(torch.bfloat16)
    img = m.decode_code(out["greedy_cfg1.tokens"])
    assert img.dtype == torch.bfloat16 and img.shape == (4, 3, 64, 64)
    torch.testing.assert_close(img.float(), out["greedy_cfg1.decode_from_bottleneck"], atol=0.15, rtol=0.05)
    tok = m.encode(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert tok.shape == (2, 4) and tok.dtype == torch.int64


def test_loads_from_s3(ref, model, s3_bucket):
    import s3fs

    d, out = ref
    s3fs.S3FileSystem().put(str(d / "vq.pt"), f"{s3_bucket}/vq/vq.pt")
    m = VQVAE.from_checkpoint(f"{s3_bucket}/vq/vq.pt")
    assert m.sha256 == model.sha256
    t = out["greedy_cfg4.tokens"]
    assert torch.equal(m.decode_code(t), model.decode_code(t))


# -- encode -----------------------------------------------------------------------------------------------


def test_encode_shape_range_determinism(model):
    x = torch.rand(3, 3, 64, 48, generator=torch.Generator().manual_seed(1))
    tok = model.encode(x)
    assert tok.shape == (3, (64 // 16) * (48 // 16)) and tok.dtype == torch.int64
    assert int(tok.min()) >= 0 and int(tok.max()) < model.codebook_size
    assert torch.equal(model.encode(x), tok)
    assert torch.equal(torch.cat([model.encode(x[i:i + 1]) for i in range(3)]), tok)
    img = model.decode_code(tok.reshape(3, 4, 3))
    assert img.shape == (3, 3, 64, 48) and torch.isfinite(img).all()


def test_encode_picks_the_nearest_normalised_codebook_row(model):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    tok = model.encode(x)
    z = model.quant_conv(model.encoder((x - 0.5) / 0.5))  # (B, D, h, w)
    z = torch.nn.functional.normalize(z.flatten(2).transpose(1, 2), dim=-1)  # (B, h*w, D)
    e = torch.nn.functional.normalize(model.quantize.embedding.weight, dim=-1)
    dist = ((z[:, :, None, :] - e[None, None]) ** 2).sum(-1)  # (B, h*w, K)
    assert torch.equal(tok, dist.argmin(-1))


def test_bad_inputs_raise(model):
    with pytest.raises(ValueError, match="multiple of the downsample"):
        model.encode(torch.rand(1, 3, 40, 32))
    with pytest.raises(ValueError, match="square"):
        model.decode_code(torch.zeros(1, 12, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        model.decode_code(torch.full((1, 4), 64))


# -- width inference --------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [
    VQConfig(ch=64, ch_mult=(1, 2), num_res_blocks=2, z_channels=8, codebook_size=32, codebook_dim=4),
    VQConfig(ch=32, ch_mult=(2, 1, 3), decoder_ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4,
             codebook_size=16, codebook_dim=2, codebook_used_size=100),
])
def test_widths_are_inferred_from_shapes(cfg, tmp_path):
    torch.manual_seed(0)
    src = VQVAE(cfg).eval()
    with torch.no_grad():  # default init leaves GroupNorm at identity; perturb so a mix-up would show
        for p in src.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = _save(tmp_path, "rand.pt", {"model": src.state_dict()})
    m = VQVAE.from_checkpoint(path)
    assert m.cfg == cfg and m.downsample == 2 ** (len(cfg.ch_mult) - 1)
    assert {k: v.shape for k, v in m.state_dict().items()} == {k: v.shape for k, v in src.state_dict().items()}
    side = 2 * m.downsample
    tok = torch.randint(0, cfg.codebook_size, (2, 4), generator=torch.Generator().manual_seed(0))
    assert torch.equal(m.decode_code(tok), src.decode_code(tok))
    assert m.decode_code(tok).shape == (2, 3, side, side)
    x = torch.rand(2, 3, side, side)
    assert torch.equal(m.encode(x), src.encode(x))


def test_real_vq16_layout_round_trips():
    """The published VQ-16 (ch 128, [1,1,2,2,4], z 256, 16384 x 8): about 72 M parameters, widths read back."""
    cfg = VQConfig(codebook_used_size=65536)
    with torch.device("meta"):  # shapes only, no memory
        sd = VQVAE(cfg).state_dict()
    assert config_from_state_dict(sd) == cfg
    assert abs(sum(v.numel() for k, v in sd.items() if k != "quantize.codebook_used") - 71.88e6) < 0.01e6
    assert sd["decoder.conv_blocks.0.attn.2.q.weight"].shape == (512, 512, 1, 1)
    assert sd["decoder.conv_blocks.1.res.0.nin_shortcut.weight"].shape == (256, 512, 1, 1)
    assert "encoder.conv_blocks.4.downsample.conv.weight" not in sd
    assert "decoder.conv_blocks.4.upsample.conv.weight" not in sd


# -- bad checkpoints --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case,needle", [
    ("missing", "file not found"),
    ("truncated", "truncated"),
    ("ta_tok", "lacks"),
    ("plain_state_dict", "expected the reference format"),
    ("missing_tensor", "missing tensors"),
    ("extra_tensor", "unexpected tensors"),
    ("wrong_shape", "shape mismatches"),
    ("no_levels", "levels"),
])
def test_bad_checkpoints_name_the_file_and_problem(tmp_path, ref, case, needle):
    d, _ = ref
    sd = _sd(ref)
    if case == "missing":
        path = str(tmp_path / "nope.pt")
    elif case == "truncated":
        good = (d / "vq.pt").read_bytes()
        path = str(tmp_path / "t.pt")
        (tmp_path / "t.pt").write_bytes(good[: len(good) // 2])
    elif case == "ta_tok":
        ta = reference_fixture("ta_tok") / "ta_tok.pth"
        path = str(ta)
    elif case == "plain_state_dict":
        path = _save(tmp_path, "p.pt", sd)
    elif case == "missing_tensor":
        del sd["decoder.conv_blocks.2.res.1.norm2.bias"]
        path = _save(tmp_path, "m.pt", {"model": sd})
    elif case == "extra_tensor":
        sd["decoder.conv_blocks.0.attn.3.q.weight"] = torch.zeros(64, 64, 1, 1)
        path = _save(tmp_path, "x.pt", {"model": sd})
    elif case == "wrong_shape":
        sd["post_quant_conv.bias"] = torch.zeros(17)
        path = _save(tmp_path, "w.pt", {"model": sd})
    elif case == "no_levels":
        sd = {k: v for k, v in sd.items() if not k.startswith("decoder.conv_blocks.")}
        path = _save(tmp_path, "l.pt", {"model": sd})
    with pytest.raises(CheckpointError) as e:
        VQVAE.from_checkpoint(path)
    assert path in str(e.value) and needle in str(e.value)


def test_checkpoint_dict_round_trips(ref, model, tmp_path):
    _, out = ref
    buf = io.BytesIO()
    torch.save(model.checkpoint_dict(), buf)
    p = tmp_path / "copy.pt"
    p.write_bytes(buf.getvalue())
    m = VQVAE.from_checkpoint(str(p))
    t = out["greedy_cfg1.tokens"]
    assert torch.equal(m.decode_code(t), model.decode_code(t))
