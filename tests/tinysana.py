"""Tiny random SANA parts (diffusers), built in the tests: a DC-AE that downsamples by 4 and a SANA transformer of
one or two layers, saved in the diffusers folder layouts the jobs read."""
from __future__ import annotations

from pathlib import Path

import torch

LATENT_CHANNELS = 4
DOWNSAMPLE = 4  # three encoder blocks: 2 ** (3 - 1)
SCALING_FACTOR = 0.41407  # SANA's DC-AE f32c32 value: the scaled latents are what the transformer sees


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderDC

    torch.manual_seed(seed)
    return AutoencoderDC(
        in_channels=3, latent_channels=LATENT_CHANNELS, attention_head_dim=2,
        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
        encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
        encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
        downsample_block_type="conv", upsample_block_type="interpolate", scaling_factor=SCALING_FACTOR)


def save_tiny_vae(folder: Path, seed: int = 0) -> Path:
    tiny_vae(seed).save_pretrained(folder)
    return folder


def transformer_config(caption_channels: int, sample_size: int, num_layers: int = 2, width_heads: int = 4) -> dict:
    """A SanaTransformer2DModel config: `width_heads` heads of 8 (width 8 * heads), latents of the tiny VAE."""
    return dict(in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_attention_heads=width_heads,
                attention_head_dim=8, num_layers=num_layers, num_cross_attention_heads=width_heads,
                cross_attention_head_dim=8, cross_attention_dim=8 * width_heads, caption_channels=caption_channels,
                sample_size=sample_size, patch_size=1, mlp_ratio=2.0)


def save_tiny_sana(folder: Path, caption_channels: int, sample_size: int, vae_seed: int = 0, **kw) -> Path:
    """A random SANA pipeline folder (transformer/, vae/, scheduler/, model_index.json) with SANA's scheduler."""
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel

    torch.manual_seed(1)
    transformer = SanaTransformer2DModel(**transformer_config(caption_channels, sample_size, **kw))
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                            use_flow_sigmas=True, flow_shift=3.0)
    SanaPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(vae_seed), transformer=transformer,
                 scheduler=scheduler).save_pretrained(folder)
    return folder
