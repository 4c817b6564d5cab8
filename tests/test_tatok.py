"""TA-Tok: parity with the reference's own outputs, loading, and bad checkpoints."""
from __future__ import annotations

import io
import shutil

import pytest
import torch
from conftest import reference_fixture

from tarflow.models.checkpoint import CheckpointError
from tarflow.models.tatok import SIGLIP2_SO400M_384, TATok, resolve_teacher


@pytest.fixture(scope="module")
def ref():
    from safetensors.torch import load_file

    d = reference_fixture("ta_tok")
    return d, load_file(str(d / "inputs.safetensors"))["pixel_values"], load_file(str(d / "outputs.safetensors"))


@pytest.fixture(scope="module")
def model(ref):
    return TATok.from_checkpoint(str(ref[0] / "ta_tok.pth"))


@pytest.mark.parametrize("scale", [1, 2, 3])
def test_codes_and_rec_match_reference(ref, model, scale):
    _, x, out = ref
    codes = model.encode(x, pool_scale=scale)
    assert codes.dtype == torch.int64
    assert torch.equal(codes, out[f"ps{scale}.bottleneck_rep"])
    torch.testing.assert_close(model.decode(codes), out[f"ps{scale}.rec"], atol=1e-4, rtol=1e-4)


def test_all_scales_from_one_encoder_pass_match_reference(ref, model):
    _, x, out = ref
    calls = []
    hook = model.encoder.embeddings.register_forward_hook(lambda *a: calls.append(1))
    try:
        codes = model.encode_scales(x, [1, 2, 3])
    finally:
        hook.remove()
    assert len(calls) == 1
    for s in (1, 2, 3):
        assert torch.equal(codes[s], out[f"ps{s}.bottleneck_rep"])


def test_encoder_features_match_reference(ref, model):
    _, x, out = ref
    torch.testing.assert_close(model.encode_features(x), out["siglip_hidden_states_select"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant,kw", [("nonstoch_l2", dict(stochastic=False)),
                                        ("nonstoch_raw", dict(stochastic=False, l2_normalized=False))])
def test_non_stochastic_variants_match_reference(ref, variant, kw):
    d, x, out = ref
    m = TATok.from_checkpoint(str(d / "ta_tok.pth"), **kw)
    codes = m.encode(x, 1)
    assert torch.equal(codes, out[f"{variant}.ps1.bottleneck_rep"])
    torch.testing.assert_close(m.decode(codes), out[f"{variant}.ps1.rec"], atol=1e-4, rtol=1e-4)


def test_preprocess_is_the_references(ref, model):
    """PIL bicubic on the uint8 image, then /255: bit-identical to the fixture's inputs."""
    import skimage.data
    from PIL import Image

    _, x, _ = ref
    images = [Image.fromarray(getattr(skimage.data, n)()) for n in ("astronaut", "coffee", "chelsea", "rocket")]
    assert torch.equal(model.preprocess(images), x)


def test_batch_invariant_in_fp32(ref, model):
    _, x, _ = ref
    for s in (1, 2, 3):
        batched = model.encode(x, s)
        single = torch.cat([model.encode(x[i:i + 1], s) for i in range(len(x))])
        assert torch.equal(batched, single)


def test_bfloat16_runs_and_stays_close(ref):
    d, x, out = ref
    m = TATok.from_checkpoint(str(d / "ta_tok.pth")).to(torch.bfloat16)
    codes = m.encode(x, 1)
    assert codes.shape == (4, 81) and int(codes.min()) >= 0 and int(codes.max()) < m.codebook_size
    ref_codes = out["ps1.bottleneck_rep"]
    rec = m.decode(ref_codes)
    assert rec.dtype == torch.bfloat16
    torch.testing.assert_close(rec.float(), out["ps1.rec"], atol=0.1, rtol=0.05)
    # bf16 moves some near-tie tokens, but most codes must survive
    assert (codes == ref_codes).float().mean() > 0.5


def test_unused_encoder_layers_are_dropped_but_checked(ref, model):
    d, x, out = ref
    assert len(model.encoder.encoder.layers) == 1  # 2 layers, select_layer_id -2 -> only the first runs
    assert not hasattr(model.encoder, "head") and not hasattr(model.encoder, "post_layernorm")
    full = TATok.from_checkpoint(str(d / "ta_tok.pth"), keep_unused=True)
    assert len(full.encoder.encoder.layers) == 2
    assert torch.equal(full.encode(x, 1), out["ps1.bottleneck_rep"])


def test_loads_from_s3_with_relative_teacher(ref, s3_bucket):
    import s3fs

    d, x, out = ref
    fs = s3fs.S3FileSystem()
    fs.put(str(d / "ta_tok.pth"), f"{s3_bucket}/models/ta_tok.pth")
    fs.put(str(d / "siglip_tiny" / "config.json"), f"{s3_bucket}/models/siglip_tiny/config.json")
    m = TATok.from_checkpoint(f"{s3_bucket}/models/ta_tok.pth")
    assert torch.equal(m.encode(x, 2), out["ps2.bottleneck_rep"])
    assert m.sha256 == TATok.from_checkpoint(str(d / "ta_tok.pth")).sha256


def test_builtin_teacher_needs_no_download():
    cfg = resolve_teacher("google/siglip2-so400m-patch14-384")
    assert cfg == SIGLIP2_SO400M_384
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.image_size // cfg.patch_size) == (1152, 27, 27)


def test_checkpoint_round_trips_in_reference_format(ref, model, tmp_path):
    d, x, out = ref
    full = TATok.from_checkpoint(str(d / "ta_tok.pth"), keep_unused=True)
    torch.save(full.checkpoint_dict(), tmp_path / "copy.pth")
    shutil.copytree(d / "siglip_tiny", tmp_path / "siglip_tiny")
    again = TATok.from_checkpoint(str(tmp_path / "copy.pth"))
    assert torch.equal(again.encode(x, 3), out["ps3.bottleneck_rep"])


# -- bad checkpoints -------------------------------------------------------------------------------------


def _bad(tmp_path, ref, name, payload=None, obj=None):
    d = ref[0]
    shutil.copytree(d / "siglip_tiny", tmp_path / "siglip_tiny", dirs_exist_ok=True)
    p = tmp_path / name
    if obj is not None:
        buf = io.BytesIO()
        torch.save(obj, buf)
        payload = buf.getvalue()
    p.write_bytes(payload)
    return str(p)


class OpaqueObject:
    pass


def _reference_obj(ref):
    return torch.load(str(ref[0] / "ta_tok.pth"), map_location="cpu", weights_only=True)


@pytest.mark.parametrize("case,needle", [
    ("missing", "file not found"),
    ("empty", "empty"),
    ("truncated", "truncated"),
    ("not_torch", "truncated or not a torch checkpoint"),
    ("plain_state_dict", "expected the reference format"),
    ("no_sd", "lacks ['sd']"),
    ("args_disagree", "args and tensors disagree"),
    ("missing_tensor", "missing tensors"),
    ("bad_teacher", "teacher 'nowhere/encoder'"),
    ("pickled_object", "not plain tensors"),
])
def test_bad_checkpoints_name_the_file_and_problem(tmp_path, ref, case, needle):
    good = (ref[0] / "ta_tok.pth").read_bytes()
    obj = _reference_obj(ref)
    if case == "missing":
        path = str(tmp_path / "nope.pth")
    elif case == "empty":
        path = _bad(tmp_path, ref, "e.pth", b"")
    elif case == "truncated":
        path = _bad(tmp_path, ref, "t.pth", good[: len(good) // 2])
    elif case == "not_torch":
        path = _bad(tmp_path, ref, "n.pth", b"this is not a checkpoint at all" * 10)
    elif case == "plain_state_dict":
        path = _bad(tmp_path, ref, "p.pth", obj=obj["model"]["sd"])
    elif case == "no_sd":
        path = _bad(tmp_path, ref, "s.pth", obj={"model": {"args": obj["model"]["args"]}})
    elif case == "args_disagree":
        obj["model"]["args"]["bottleneck"]["args"]["bottleneck_dim"] = 16
        path = _bad(tmp_path, ref, "a.pth", obj=obj)
    elif case == "missing_tensor":
        del obj["model"]["sd"]["bottleneck.in_linear.weight"]
        path = _bad(tmp_path, ref, "m.pth", obj=obj)
    elif case == "bad_teacher":
        obj["model"]["args"]["teacher"] = "nowhere/encoder"
        path = _bad(tmp_path, ref, "b.pth", obj=obj)
    elif case == "pickled_object":
        obj["model"]["args"] = OpaqueObject()  # unpickling it would run arbitrary code
        path = _bad(tmp_path, ref, "o.pth", obj=obj)
    with pytest.raises(CheckpointError) as e:
        TATok.from_checkpoint(path)
    assert path in str(e.value) and needle in str(e.value)


def test_encode_rejects_wrong_input_shape(model):
    with pytest.raises(ValueError, match="preprocess"):
        model.encode(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="codes must lie"):
        model.decode(torch.full((1, 9), model.codebook_size))
