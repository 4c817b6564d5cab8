"""The diffusion de-tokenizer: TA-Tok "rec" features -> pixels with Tar's SANA 600M (diffusers).

    rec features (B, n, C)   C = 1152 for Tar; they take the place of SANA's Gemma prompt embeddings
      -> SanaPipeline(prompt_embeds=rec, prompt_attention_mask=ones(B, n))
           latents (B, 32, S, S) ~ N(0, I), S = transformer sample_size (16 for 512 px, 32 for 1024 px)
           num_inference_steps x  SanaTransformer2DModel, CFG: u + g * (c - u)
           AutoencoderDC.decode (x32 upsampling)                   (B, 3, 32 S, 32 S) in [-1, 1]
      -> uint8 images (B, H, W, 3)

Checkpoints are diffusers pipeline folders (`Tar-SANA-600M-{512,1024}px`): transformer/, vae/, scheduler/,
model_index.json, and in Tar's folders also text_encoder/ + tokenizer/ (Gemma, several GB, unused here: the
condition is the rec features, so neither is loaded or downloaded) and negative_prompt_embeds.pth, the
unconditional condition for CFG (a (L, C) tensor that Tar's reference feeds with an all-ones mask).

diffusers is an optional dependency (`pip install 'tarflow[diffusion]'`): this module imports without it, and
only building or loading a DiffusionDetokenizer needs it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from tarflow.data import storage
from tarflow.models.checkpoint import CheckpointError, read_checkpoint
from tarflow.models.device import resolve_device_dtype

INSTALL_HINT = "pip install 'tarflow[diffusion]'"

# Subfolders of a diffusers SANA pipeline folder that this de-tokenizer never uses: skipped when downloading.
UNUSED_SUBFOLDERS = ("text_encoder", "tokenizer")
NEGATIVE_EMBEDS_FILE = "negative_prompt_embeds.pth"


def _import_diffusers():
    """diffusers, or an ImportError that says how to get it (it is an optional extra of tarflow)."""
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(
            f"the diffusion de-tokenizer needs the `diffusers` package, which is not installed ({e}); "
            f"install it with: {INSTALL_HINT}"
        ) from None
    return diffusers


# ----------------------------------------------------------------------------------------------------------
# Fetching a pipeline folder from object storage


def default_cache_dir() -> Path:
    """Where remote pipeline folders are copied: $TARFLOW_HOME/diffusion_detok (default ~/.cache/tarflow/...)."""
    return storage.tarflow_home() / "diffusion_detok"


def _is_unused(rel: str) -> bool:
    return rel.split("/", 1)[0] in UNUSED_SUBFOLDERS


def download_folder(url: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Copy the pipeline folder at `url` (s3://..., any fsspec URL) to a local cache folder and return it; the
    text encoder and tokenizer are skipped (see storage.cached_folder_copy)."""
    try:
        return storage.cached_folder_copy(url, cache_dir or default_cache_dir(), keep=lambda rel: not _is_unused(rel))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"diffusion de-tokenizer folder {url}: nothing found there; expected a diffusers pipeline folder "
            f"(transformer/, vae/, scheduler/). Check the URL and the AWS_* credentials / AWS_ENDPOINT_URL"
        ) from None


# ----------------------------------------------------------------------------------------------------------
# The de-tokenizer


class DiffusionDetokenizer:
    """SANA conditioned on TA-Tok rec features (Tar's diffusion de-tokenizer); `generate` turns features into images.

    transformer: diffusers SanaTransformer2DModel (its caption projection reads C = caption_channels);
    vae: AutoencoderDC; scheduler: the folder's scheduler (Tar/SANA: flow-matching DPM-Solver++);
    negative_embeds: (L, C) unconditional condition for CFG, or None for all zeros.
    """

    def __init__(self, transformer, vae, scheduler, negative_embeds: torch.Tensor | None = None,
                 device: str | torch.device = "cpu", source: str = "<in memory>"):
        diffusers = _import_diffusers()
        self.source = source
        self.device = torch.device(device)
        # SanaPipeline only needs the text encoder when it is given `prompt` strings; generate() always passes
        # prompt_embeds and negative_prompt_embeds, so the pipeline runs with neither text encoder nor tokenizer.
        self.pipe = diffusers.SanaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                           scheduler=scheduler)
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        if negative_embeds is not None:
            negative_embeds = negative_embeds.detach().float().cpu()
            if negative_embeds.ndim == 3 and negative_embeds.shape[0] == 1:
                negative_embeds = negative_embeds[0]  # (1, L, C) -> (L, C)
            if negative_embeds.ndim != 2 or negative_embeds.shape[1] != self.condition_width:
                raise ValueError(
                    f"diffusion de-tokenizer {source}: negative embeddings have shape {tuple(negative_embeds.shape)}, "
                    f"expected (L, {self.condition_width}) to match the transformer's caption_channels; "
                    f"is {NEGATIVE_EMBEDS_FILE} from this model?"
                )
        self.negative_embeds = negative_embeds  # (L, C) float32 on CPU, or None

    # -- loading ---------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None,
                        cache_dir: str | os.PathLike | None = None) -> "DiffusionDetokenizer":
        """Load a diffusers SANA pipeline folder, local or s3:// (copied to `cache_dir` first; see download_folder).

        dtype: the transformer's dtype; default bfloat16 on CUDA (as Tar's reference) and float32 elsewhere. The
        VAE always runs in float32, as in the reference (the DC-AE decoder is the part sensitive to precision).
        device: default cuda when available, else cpu. Nothing is ever fetched from the Hugging Face hub.
        """
        diffusers = _import_diffusers()
        source = str(path)
        device, dtype = resolve_device_dtype(device, dtype)

        local = Path(download_folder(source, cache_dir) if storage.is_remote(source)
                     else source.removeprefix("file://"))
        if not local.is_dir():
            raise FileNotFoundError(f"diffusion de-tokenizer folder {source}: not found (a local folder or s3:// URL "
                                    f"of a diffusers SANA pipeline folder, e.g. Tar-SANA-600M-1024px)")
        missing = [d for d in ("transformer", "vae", "scheduler") if not (local / d).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"diffusion de-tokenizer folder {source}: missing subfolder(s) {missing}; expected a diffusers "
                f"SANA pipeline folder (e.g. Tar-SANA-600M-1024px) with transformer/, vae/ and scheduler/"
            )

        # local_files_only: a local folder never reaches the hub, and this makes sure of it
        transformer = diffusers.SanaTransformer2DModel.from_pretrained(
            str(local), subfolder="transformer", torch_dtype=dtype, local_files_only=True)
        vae = diffusers.AutoencoderDC.from_pretrained(
            str(local), subfolder="vae", torch_dtype=torch.float32, local_files_only=True)
        scheduler = _load_scheduler(diffusers, local / "scheduler", source)

        negative = None
        if (local / NEGATIVE_EMBEDS_FILE).is_file():
            # weights_only loading with errors that name the file (see tarflow.models.checkpoint)
            negative = read_checkpoint(str(local / NEGATIVE_EMBEDS_FILE)).obj
            if not isinstance(negative, torch.Tensor):
                raise CheckpointError(str(local / NEGATIVE_EMBEDS_FILE),
                                      f"expected one tensor of shape (L, C), found {type(negative).__name__}")
        return cls(transformer, vae, scheduler, negative_embeds=negative, device=device, source=source)

    # -- facts about the model -------------------------------------------------------------------------------

    @property
    def condition_width(self) -> int:
        """C: the width of the rec features the caption projection reads (1152 for Tar)."""
        return int(self.pipe.transformer.config.caption_channels)

    @property
    def default_size(self) -> int:
        """Image side in pixels the model was trained for: latent sample_size x the VAE's downsampling (32)."""
        return int(self.pipe.transformer.config.sample_size) * int(self.pipe.vae_scale_factor)

    # -- generation ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, rec_features: torch.Tensor, guidance_scale: float = 4.0, num_inference_steps: int = 20,
                 seed: int | Sequence[int] = 0, height: int | None = None, width: int | None = None,
                 output: str = "np"):
        """rec_features (B, n, C) -> images: uint8 numpy (B, H, W, 3) (output="np") or a list of PIL images ("pil").

        seed: one int (every row starts from the same noise) or one int per row. Each row's noise comes from its
        own CPU torch.Generator, so a row's image does not depend on its batch neighbours, and a seed gives the
        same starting noise on any device. guidance_scale <= 1 turns CFG off (one transformer pass per step).
        """
        if output not in ("np", "pil"):
            raise ValueError(f"output must be 'np' or 'pil', got {output!r}")
        if rec_features.ndim != 3:
            raise ValueError(f"rec_features must be (B, n, C), got shape {tuple(rec_features.shape)}")
        b, n, c = rec_features.shape
        if c != self.condition_width:
            raise ValueError(
                f"rec features have width C={c}, but the diffusion de-tokenizer {self.source} expects "
                f"C={self.condition_width} (its transformer's caption_channels); use the TA-Tok whose rec "
                f"features this model was trained on"
            )
        if b == 0 or n == 0:
            raise ValueError(f"rec_features must hold at least one row and one token, got {tuple(rec_features.shape)}")
        seeds = [int(seed)] * b if isinstance(seed, (int, np.integer)) else [int(s) for s in seed]
        if len(seeds) != b:
            raise ValueError(f"got {len(seeds)} seeds for a batch of {b} rows; pass one int or one per row")
        height = height or self.default_size
        width = width or self.default_size
        if height % 32 or width % 32:  # the pipeline's own rule (VAE x32 downsampling, patch 1)
            raise ValueError(f"height and width must be multiples of 32, got {height} x {width}")

        cond = rec_features.to(self.device, torch.float32)                     # (B, n, C)
        cond_mask = torch.ones(b, n, dtype=torch.long, device=self.device)      # all ones, as Tar
        if self.negative_embeds is not None:
            # Tar's reference: the folder's negative_prompt_embeds.pth with an all-ones mask
            neg = self.negative_embeds.to(self.device)[None].expand(b, -1, -1)  # (B, L, C)
        else:
            # No negative embeddings shipped: all-zero rec features (tarflow's choice, as for the AR
            # de-tokenizer's null condition); Tar's reference always has the file.
            neg = torch.zeros_like(cond)
        neg_mask = torch.ones(neg.shape[:2], dtype=torch.long, device=self.device)
        # the pipeline concatenates [uncond; cond] along the batch, so both must have the same length: pad the
        # shorter one with masked-out zero tokens (mask 0 -> -10000 attention bias, i.e. no contribution)
        length = max(n, neg.shape[1])
        cond, cond_mask = _pad_tokens(cond, cond_mask, length)
        neg, neg_mask = _pad_tokens(neg, neg_mask, length)

        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        images = self.pipe(
            prompt_embeds=cond, prompt_attention_mask=cond_mask,
            negative_prompt=None,  # else the pipeline's default "" collides with negative_prompt_embeds
            negative_prompt_embeds=neg, negative_prompt_attention_mask=neg_mask,
            guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
            height=height, width=width, generator=generators,
            use_resolution_binning=False,  # sizes are given explicitly; binning would silently change them
            output_type="pt",
        ).images                                                                # (B, 3, H, W) float in [0, 1]
        # same rounding as diffusers' numpy_to_pil, so "np" and "pil" agree pixel for pixel
        arr = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
        arr = arr.permute(0, 2, 3, 1).cpu().numpy()                              # (B, H, W, 3) uint8
        if output == "pil":
            from PIL import Image

            return [Image.fromarray(a) for a in arr]
        return arr


def _load_scheduler(diffusers, folder: Path, source: str):
    """The scheduler class named in scheduler_config.json (SANA: DPMSolverMultistepScheduler with flow sigmas)."""
    cfg_path = folder / "scheduler_config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"diffusion de-tokenizer folder {source}: {cfg_path} not found")
    name = json.loads(cfg_path.read_text()).get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ValueError(
            f"diffusion de-tokenizer folder {source}: scheduler class {name!r} in {cfg_path} is not in diffusers "
            f"{diffusers.__version__}; upgrade diffusers or fix the config"
        )
    return cls.from_pretrained(str(folder))


def _pad_tokens(x: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, n, C), (B, n) -> (B, length, C), (B, length): zero tokens with mask 0 appended."""
    extra = length - x.shape[1]
    if extra <= 0:
        return x, mask
    x = torch.cat([x, x.new_zeros(x.shape[0], extra, x.shape[2])], dim=1)
    mask = torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], dim=1)
    return x, mask


# SANA 600M's SanaTransformer2DModel config (Efficient-Large-Model/Sana_600M_512px_diffusers), with Tar's condition
# width (TA-Tok rec features, 1152) in place of Gemma's 2304: 28 layers, width 1152 = 36 heads x 32, cross-attention
# 16 heads x 72, Mix-FFN ratio 2.5, patch 1 on the DC-AE's 32 latent channels; sample_size 16 = 512 px (32: 1024 px).
SANA_600M = dict(in_channels=32, out_channels=32, num_attention_heads=36, attention_head_dim=32, num_layers=28,
                 num_cross_attention_heads=16, cross_attention_head_dim=72, cross_attention_dim=1152,
                 caption_channels=1152, mlp_ratio=2.5, dropout=0.0, norm_elementwise_affine=False, norm_eps=1e-6,
                 sample_size=16, patch_size=1)


# ----------------------------------------------------------------------------------------------------------
# The VAE side: latents as training data (tokenize --latents) and as the trainer's target

VAE_CLASS = "AutoencoderDC"  # SANA's DC-AE


def vae_folder(path: str) -> str:
    """The AutoencoderDC folder that `path` names: the folder itself when it holds an AutoencoderDC
    config.json, else its vae/ (a SANA pipeline folder). Local or s3://; raises FileNotFoundError (one line,
    naming the path and the fix) when neither holds one."""
    root = str(path).rstrip("/")
    for cand in (root, storage.join(root, "vae")):
        try:
            cfg = json.loads(storage.read_bytes(storage.join(cand, "config.json")))
        except (FileNotFoundError, ValueError, OSError):
            continue
        if cfg.get("_class_name") == VAE_CLASS:
            return cand
    raise FileNotFoundError(f"{path}: no {VAE_CLASS} config.json there nor in its vae/; give a diffusers "
                            f"{VAE_CLASS} folder (SANA's DC-AE) or a SANA pipeline folder")


def vae_config(folder: str) -> dict:
    """The AutoencoderDC config.json of `folder` (as vae_folder returns it): no weights are read."""
    return json.loads(storage.read_bytes(storage.join(folder, "config.json")))


def vae_downsample(config: dict) -> int:
    """Pixels per latent side: 2 ** (encoder blocks - 1), as diffusers' AutoencoderDC.spatial_compression_ratio
    (32 for SANA's DC-AE f32c32)."""
    return 2 ** (len(config["encoder_block_out_channels"]) - 1)


def load_vae(path: str, device: str | torch.device = "cpu", cache_dir: str | os.PathLike | None = None):
    """The AutoencoderDC at `path` (see vae_folder; s3:// is copied to the cache first), float32, eval, frozen.
    float32: the reference runs the DC-AE in float32 (the part sensitive to precision), and latents are
    training targets."""
    diffusers = _import_diffusers()
    folder = vae_folder(path)
    local = storage.cached_folder_copy(folder, cache_dir or default_cache_dir()) if storage.is_remote(folder) \
        else Path(folder.removeprefix("file://"))
    vae = diffusers.AutoencoderDC.from_pretrained(str(local), torch_dtype=torch.float32, local_files_only=True)
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, H, W, 3) -> the DC-AE's latents (B, C, H/f, W/f) float32, unscaled (before
    config.scaling_factor). Pixels go to [-1, 1] as SANA's training transform does (ToTensor, Normalize(0.5,
    0.5))."""
    x = images.to(next(vae.parameters()).device).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W)
    return vae.encode(x).latent.float()
