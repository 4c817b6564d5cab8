"""GPU benchmark of the tokenize job (issue: >= 450 images/s model-only per H200, end-to-end >= 90% of it).

    python bench/gpu_tokenize.py              # H200: the real TA-Tok shape, bf16, JPEG shards made here
    python bench/gpu_tokenize.py --tiny       # any machine: a small model on CPU, the same measurements

Real shape: SigLIP2 so400m/14 at 384 px (27 layers, select_layer_id -2), 1536 x 65536 codebook, decoder
depth 3, random weights. Inputs: photo-like 512 px JPEGs in img2dataset-style tars. Prints, in one run:
  model-only images/s   encode_scales on pre-decoded uint8 tensors already on the device (scales 1,2,3)
  end-to-end images/s   the tokenize job on a local Ray (read, decode, encode, write), steady state
and writes them as JSON (to --json, or $OUT/gpu_tokenize.json when $OUT is set).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

# bench/tokenize.py shadows the standard library's `tokenize` for scripts run from this folder: take the folder
# off the path and import the benchmark helpers as a package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

from bench.common import photo_like_jpegs, write_results, write_shards  # noqa: E402


def build_checkpoint(folder: str, tiny: bool) -> str:
    import torch

    from tarflow.models.tatok import SIGLIP2_SO400M_384, random_tatok

    if tiny:
        model, cfg = random_tatok(0, teacher="encoder")
        os.makedirs(os.path.join(folder, "encoder"), exist_ok=True)
        with open(os.path.join(folder, "encoder", "config.json"), "w") as f:
            json.dump(cfg, f)
    else:
        model, _ = random_tatok(0, teacher="google/siglip2-so400m-patch14-384", encoder=SIGLIP2_SO400M_384,
                                bottleneck_dim=1536, codebook_size=65536, decoder_depth=3)
    path = os.path.join(folder, "ta_tok.pth")
    torch.save(model.checkpoint_dict(), path)
    return path


def model_only(ckpt: str, n: int, batch: int, device: str, dtype: str, scales) -> float:
    import numpy as np
    import torch

    from tarflow.models.tatok import TATok, pixels_from_uint8

    model = TATok.from_checkpoint(ckpt).to(device, getattr(torch, dtype))
    S = model.input_size
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (batch, S, S, 3), dtype=np.uint8)).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):  # warm-up (kernels, codebook cache)
        model.encode_scales(pixels_from_uint8(x), scales)
    sync()
    steps = max(1, n // batch)
    t0 = time.time()
    for _ in range(steps):
        codes = model.encode_scales(pixels_from_uint8(x), scales)
    [c.cpu() for c in codes.values()]
    sync()
    return steps * batch / (time.time() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="small model on CPU (where no GPU is lent)")
    p.add_argument("--images", type=int, default=None, help="images per measurement (8192 GPU / 512 tiny)")
    p.add_argument("--per-shard", type=int, default=None, help="images per shard (512 GPU / 64 tiny)")
    p.add_argument("--batch-size", type=int, default=None, help="encoder batch (256 GPU / 32 tiny)")
    p.add_argument("--jpeg-size", type=int, default=512)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    import torch

    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    dtype = "bfloat16" if device == "cuda" else "float32"
    n = args.images or (512 if args.tiny else 8192)
    per_shard = args.per_shard or (64 if args.tiny else 512)
    batch = args.batch_size or (32 if args.tiny else 256)
    scales = [1, 2, 3]
    res = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": dtype, "images": n,
           "batch": batch, "tiny": args.tiny, "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    work = tempfile.mkdtemp(prefix="tarflow-gpu-bench-")
    try:
        t = time.time()
        ckpt = build_checkpoint(work, args.tiny)
        write_shards(os.path.join(work, "in"), photo_like_jpegs(n, args.jpeg_size), per_shard)
        print(f"setup {time.time() - t:.1f} s", flush=True)
        res["model_only_images_per_s"] = model_only(ckpt, n, batch, device, dtype, scales)
        print(f"model-only : {res['model_only_images_per_s']:.1f} images/s", flush=True)

        from tarflow.pipelines.runtime import init_ray
        from tarflow.pipelines.tokenize import TokenizeConfig, run_tokenize

        init_ray(progress_bars=False)
        summary = run_tokenize(TokenizeConfig(input=os.path.join(work, "in"), output=os.path.join(work, "out"),
                                              tatok=ckpt, scales=scales, encode_batch_size=batch, dtype=dtype,
                                              device=device, progress_every_s=30))
        assert summary.samples_ok == n, summary.render()
        res["end_to_end_images_per_s"] = summary.steady_images_per_s
        res["end_to_end_incl_startup_images_per_s"] = summary.images_per_s
        res["end_to_end_over_model_only"] = res["end_to_end_images_per_s"] / res["model_only_images_per_s"]
        print(f"end-to-end : {res['end_to_end_images_per_s']:.1f} images/s steady "
              f"({summary.images_per_s:.1f} with start-up)")
        print(f"ratio end-to-end / model-only: {res['end_to_end_over_model_only']:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_results(res, args.json, "gpu_tokenize.json")


if __name__ == "__main__":
    main()
