"""The diffusion de-tokenizer (SANA conditioned on TA-Tok rec features) on a tiny random SANA, CPU.

No parity fixture exists for Tar's SANA de-tokenizer; these tests pin the wiring: loading a diffusers pipeline
folder (local and s3://) without a text encoder, the condition/CFG plumbing, seeding and batch invariance.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel  # noqa: E402

from tarflow.models.diffusion_detok import (  # noqa: E402
    INSTALL_HINT, NEGATIVE_EMBEDS_FILE, DiffusionDetokenizer, download_folder)

C = 36       # rec feature width of the tiny model (Tar: 1152)
N = 5        # condition tokens per row (Tar: 729 / 169 / 81)
SIZE = 64    # image side: sample_size 32 x VAE downsampling 2
STEPS = 4    # few steps keep the suite fast; the default (20) is exercised once


def _save_tiny_sana(folder: Path) -> Path:
    """A random SANA pipeline in the diffusers folder layout, with Tar's extra (unusable) text encoder files."""
    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=4, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=C,
        sample_size=SIZE // 2, patch_size=1)
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"), decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
        downsample_block_type="conv", upsample_block_type="interpolate", scaling_factor=0.41407)
    # SANA's scheduler: DPM-Solver++ on flow-matching sigmas
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                            use_flow_sigmas=True, flow_shift=3.0)
    SanaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                 scheduler=scheduler).save_pretrained(folder)
    # Tar's folders also hold Gemma; garbage here proves that it is neither loaded nor downloaded
    for rel in ("text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer/tokenizer.json"):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text("not a model")
    return folder


@pytest.fixture(scope="module")
def sana_folder(tmp_path_factory) -> Path:
    return _save_tiny_sana(tmp_path_factory.mktemp("sana") / "Tiny-SANA")


@pytest.fixture(scope="module")
def detok(sana_folder) -> DiffusionDetokenizer:
    return DiffusionDetokenizer.from_pretrained(sana_folder, device="cpu")


def _rec(seed: int, b: int = 1, n: int = N, c: int = C) -> torch.Tensor:  # (b, n, c)
    return torch.randn(b, n, c, generator=torch.Generator().manual_seed(seed))


def test_shapes_dtype_and_defaults(detok):
    assert detok.condition_width == C and detok.default_size == SIZE
    assert detok.negative_embeds is None  # the tiny folder ships none: zeros are the unconditional input
    images = detok.generate(_rec(1, b=2))  # the defaults: guidance 4.0, 20 steps, seed 0
    assert images.shape == (2, SIZE, SIZE, 3) and images.dtype == np.uint8
    pil = detok.generate(_rec(1, b=2), output="pil")
    assert [p.size for p in pil] == [(SIZE, SIZE)] * 2
    np.testing.assert_array_equal(np.stack([np.asarray(p) for p in pil]), images)  # same rounding


def test_fixed_seed_is_deterministic_and_seeds_differ(detok):
    x = _rec(2)
    a = detok.generate(x, num_inference_steps=STEPS, seed=5)
    np.testing.assert_array_equal(a, detok.generate(x, num_inference_steps=STEPS, seed=5))
    assert not np.array_equal(a, detok.generate(x, num_inference_steps=STEPS, seed=6))


def test_guidance_scale_changes_the_output(detok):
    x = _rec(3)
    with_cfg = detok.generate(x, guidance_scale=4.0, num_inference_steps=STEPS, seed=0)
    without = detok.generate(x, guidance_scale=1.0, num_inference_steps=STEPS, seed=0)
    assert not np.array_equal(with_cfg, without)


def test_each_row_matches_generating_it_alone(detok):
    # two different conditions and seeds in one batch vs one at a time. On CPU the batched matmuls round
    # differently from the single-row ones (float32 differences ~1e-7), which can flip a uint8 pixel by one
    # level after x255 rounding; so: at most 1 level apart, and nearly all pixels identical.
    x0, x1 = _rec(10), _rec(11)
    batch = detok.generate(torch.cat([x0, x1]), num_inference_steps=STEPS, seed=[3, 7])
    alone = np.concatenate([detok.generate(x0, num_inference_steps=STEPS, seed=3),
                            detok.generate(x1, num_inference_steps=STEPS, seed=7)])
    diff = np.abs(batch.astype(int) - alone.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99, (diff.max(), (diff == 0).mean())
    assert not np.array_equal(batch[0], batch[1])
    # an int seed is every row's seed
    both = detok.generate(torch.cat([x0, x1]), num_inference_steps=STEPS, seed=3)
    assert np.abs(both[0].astype(int) - alone[0].astype(int)).max() <= 1


def test_wrong_condition_width_is_a_clear_error(detok):
    with pytest.raises(ValueError, match=r"C=20.*C=36.*caption_channels"):
        detok.generate(_rec(0, c=20), num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="seeds"):
        detok.generate(_rec(0, b=2), num_inference_steps=STEPS, seed=[1, 2, 3])


def test_negative_embeds_file_is_the_unconditional_input(sana_folder, detok, tmp_path):
    folder = tmp_path / "with-negative"
    shutil.copytree(sana_folder, folder)
    # a different length (3) than the condition (5): the shorter side is padded with masked tokens
    torch.save(torch.randn(3, C, generator=torch.Generator().manual_seed(9)), folder / NEGATIVE_EMBEDS_FILE)
    with_neg = DiffusionDetokenizer.from_pretrained(folder, device="cpu")
    assert tuple(with_neg.negative_embeds.shape) == (3, C)
    x = _rec(4)
    a = with_neg.generate(x, num_inference_steps=STEPS)
    assert a.shape == (1, SIZE, SIZE, 3)
    assert not np.array_equal(a, detok.generate(x, num_inference_steps=STEPS))  # zeros vs the file
    # without CFG the negative is unused: same image as the zero-negative model
    np.testing.assert_array_equal(with_neg.generate(x, guidance_scale=1.0, num_inference_steps=STEPS),
                                  detok.generate(x, guidance_scale=1.0, num_inference_steps=STEPS))

    torch.save(torch.randn(3, C + 1), folder / NEGATIVE_EMBEDS_FILE)
    with pytest.raises(ValueError, match=NEGATIVE_EMBEDS_FILE):
        DiffusionDetokenizer.from_pretrained(folder, device="cpu")


def test_load_from_s3(sana_folder, detok, s3_bucket, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem()
    url = f"{s3_bucket}/models/Tiny-SANA"
    fs.put(str(sana_folder), url, recursive=True)
    cache = tmp_path / "cache"
    remote = DiffusionDetokenizer.from_pretrained(url, device="cpu", cache_dir=cache)
    x = _rec(5)
    np.testing.assert_array_equal(remote.generate(x, num_inference_steps=STEPS),
                                  detok.generate(x, num_inference_steps=STEPS))
    (local,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert (local / "transformer").is_dir() and not (local / "text_encoder").exists()  # Gemma is skipped
    # a second load reuses the completed copy
    marker = local / ".complete"
    stamp = marker.stat().st_mtime_ns
    assert download_folder(url, cache) == local and marker.stat().st_mtime_ns == stamp
    assert {rel for rel, _, _ in json.loads(marker.read_text())} >= {"transformer/config.json", "vae/config.json"}

    with pytest.raises(FileNotFoundError, match=f"{s3_bucket}/nothing-here"):
        DiffusionDetokenizer.from_pretrained(f"{s3_bucket}/nothing-here", device="cpu", cache_dir=cache)


def test_missing_local_folder_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        DiffusionDetokenizer.from_pretrained(tmp_path / "no-such-folder", device="cpu")
    (tmp_path / "half" / "vae").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"half.*\['transformer', 'scheduler'\]"):
        DiffusionDetokenizer.from_pretrained(tmp_path / "half", device="cpu")


def test_without_diffusers_import_works_and_loading_says_how_to_install(sana_folder, monkeypatch):
    # sys.modules[name] = None makes `import diffusers` raise ImportError; load a fresh copy of the module under
    # another name so that the already-imported one (used by the other tests) is left alone
    monkeypatch.setitem(sys.modules, "diffusers", None)
    import tarflow.models.diffusion_detok as mod

    spec = importlib.util.spec_from_file_location("_diffusion_detok_without_diffusers", mod.__file__)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)  # importing works
    with pytest.raises(ImportError, match=r"pip install 'tarflow\[diffusion\]'"):
        fresh.DiffusionDetokenizer.from_pretrained(sana_folder, device="cpu")
    with pytest.raises(ImportError, match=r"pip install 'tarflow\[diffusion\]'"):
        fresh.DiffusionDetokenizer(None, None, None)
    assert INSTALL_HINT == "pip install 'tarflow[diffusion]'"
