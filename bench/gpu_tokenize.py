"""GPU benchmark of the tokenize job (issue: >= 450 images/s model-only per H200, end-to-end >= 90% of it).

    python bench/gpu_tokenize.py              # H200: the real TA-Tok shape, bf16, JPEG shards made here
    python bench/gpu_tokenize.py --tiny       # any machine: a small model on CPU, the same measurements

Real shape: SigLIP2 so400m/14 at 384 px (27 layers, select_layer_id -2), 1536 x 65536 codebook, decoder
depth 3, random weights. Inputs: photo-like 512 px JPEGs in img2dataset-style tars. Prints, in one run:
  model-only images/s   encode_scales on pre-decoded uint8 tensors already on the device (scales 1,2,3)
  end-to-end images/s   the tokenize job on a local Ray (read, decode, encode, write), steady state
and writes them as JSON (to --json, or $OUT/gpu_tokenize.json when $OUT is set). The end-to-end part needs
Ray; bench/gpu_check.py measures the model-only rate and the job's CPU stage (decode_throughput) without it.
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

from bench.common import Results, device_name, photo_like_jpegs, results_path, sync, write_shards  # noqa: E402


def build_tatok(tiny: bool):
    """A TA-Tok with random weights, eval mode: the real shape (SigLIP2 so400m/14-384 built in, 1536 x 65536
    codebook, decoder depth 3) or a small one. Returns (model, encoder config.json for the small one)."""
    from tarflow.models.tatok import SIGLIP2_SO400M_384, random_tatok

    if tiny:
        return random_tatok(0, teacher="encoder")
    return random_tatok(0, teacher="google/siglip2-so400m-patch14-384", encoder=SIGLIP2_SO400M_384,
                        bottleneck_dim=1536, codebook_size=65536, decoder_depth=3)


def build_checkpoint(folder: str, tiny: bool) -> str:
    import torch

    model, cfg = build_tatok(tiny)
    if tiny:
        os.makedirs(os.path.join(folder, "encoder"), exist_ok=True)
        with open(os.path.join(folder, "encoder", "config.json"), "w") as f:
            json.dump(cfg, f)
    path = os.path.join(folder, "ta_tok.pth")
    torch.save(model.checkpoint_dict(), path)
    return path


def model_only(model, batch: int, scales, *, max_images: int, seconds: float | None = None, encode=None) -> float:
    """images/s of `encode(pixels, scales)` (default: the model's encode_scales, as the encoder actor calls
    it) on pre-decoded uint8 images already on the model's device: TA-Tok alone, no decoding, no I/O.
    Two warm-up batches (kernels, the codebook cache; a compiled `encode` compiles there), then batches until
    `max_images` or, after the first, until `seconds` have passed."""
    import numpy as np
    import torch

    from tarflow.models.tatok import pixels_from_uint8

    encode = encode or model.encode_scales
    device = model.scale_layer.shift.device
    S = model.input_size
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (batch, S, S, 3), dtype=np.uint8)).to(device)
    for _ in range(2):
        encode(pixels_from_uint8(x), scales)
    sync(device)
    steps, t0 = 0, time.perf_counter()
    while steps * batch < max_images:
        codes = encode(pixels_from_uint8(x), scales)
        sync(device)
        steps += 1
        if seconds is not None and time.perf_counter() - t0 >= seconds:
            break
    if isinstance(codes, dict):
        [c.cpu() for c in codes.values()]  # the actor takes the codes off the device
    return steps * batch / (time.perf_counter() - t0)


# -- the CPU side of the tokenize job: ImageDecoder in worker processes, without Ray -------------------------

_DECODER_STATE: tuple | None = None  # (raw batches, ImageDecoder) in each worker process


def raw_batches(jpegs: list[bytes], rows: int | None = None) -> list:
    """Raw sample rows as the job's ShardReader yields them, in the job's decode batches (TokenizeConfig's
    decode_batch_size), cycling through `jpegs`."""
    import pyarrow as pa

    from tarflow.data.schema import TOKENIZE_RAW_ROWS
    from tarflow.pipelines.tokenize import TokenizeConfig

    rows = rows or TokenizeConfig.decode_batch_size

    out = []
    for b in range(max(1, len(jpegs) // rows)):
        out.append(pa.Table.from_pylist([
            {"shard": "bench", "idx": i, "key": f"{i:09d}", "kind": "sample", "image": jpegs[i % len(jpegs)],
             "image_suffix": "jpg", "txt": f"photo {i}".encode(),
             "json": json.dumps({"key": f"{i:09d}", "url": f"http://x/{i}"}).encode()}
            for i in range(b * rows, (b + 1) * rows)], schema=TOKENIZE_RAW_ROWS))
    return out


def _decoder_init(batches, input_size: int) -> None:
    global _DECODER_STATE
    from tarflow.pipelines.image_stages import ImageDecoder

    _DECODER_STATE = (batches, ImageDecoder(input_size))


def _decode_batches(n: int) -> int:
    """Run the job's ImageDecoder on `n` raw batches; the decoded rows stay here. Returns images decoded."""
    batches, decoder = _DECODER_STATE
    ok = 0
    for i in range(n):
        ok += sum(decoder(batches[i % len(batches)]).column("ok").to_pylist())
    return ok


def decode_throughput(jpegs: list[bytes], input_size: int, processes: int, seconds: float) -> dict:
    """images/s of the tokenize job's CPU stage (tarflow.pipelines.image_stages.ImageDecoder: JPEG decode with
    decode_rgb, resize_uint8 to the TA-Tok input size, sha256, caption and metadata) in `processes` worker
    processes, for about `seconds`. The decoded pixels stay in the workers: moving them to the encoder (Ray's
    object store in the job) is not counted."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # fresh workers: the calling process may hold a CUDA context, which forks badly
    batches = raw_batches(jpegs)
    rows = batches[0].num_rows
    per_task = 2  # batches per task: short tasks keep every worker busy until the end
    with ctx.Pool(processes, initializer=_decoder_init, initargs=(batches, input_size)) as pool:
        pool.map(_decode_batches, [1] * processes, chunksize=1)  # warm-up: imports, first decode
        t0 = time.perf_counter()
        pending = [pool.apply_async(_decode_batches, (per_task,)) for _ in range(2 * processes)]
        done = 0
        while pending:
            n = pending.pop(0).get()
            if n != per_task * rows:
                raise RuntimeError(f"the decoder failed {per_task * rows - n} of {per_task * rows} images")
            done += n
            if time.perf_counter() - t0 < seconds:
                pending.append(pool.apply_async(_decode_batches, (per_task,)))
        s = time.perf_counter() - t0
    return {"images_per_s": done / s, "images_per_s_per_process": done / s / processes, "images": done,
            "seconds": s, "processes": processes, "input_size": input_size}


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
    res = Results("tokenize", results_path(args.json, "gpu_tokenize.json"), device=device_name(device),
                  dtype=dtype, images=n, batch=batch, tiny=args.tiny, cpus=os.cpu_count(),
                  date=time.strftime("%Y-%m-%d"))
    work = tempfile.mkdtemp(prefix="tarflow-gpu-bench-")
    try:
        t = time.time()
        ckpt = build_checkpoint(work, args.tiny)
        write_shards(os.path.join(work, "in"), photo_like_jpegs(n, args.jpeg_size), per_shard)
        print(f"setup {time.time() - t:.1f} s", flush=True)
        from tarflow.models.tatok import TATok

        model = TATok.from_checkpoint(ckpt).to(device, getattr(torch, dtype))
        model_ips = model_only(model, batch, scales, max_images=n)
        res.figure(model_only_images_per_s=model_ips)
        del model
        print(f"model-only : {model_ips:.1f} images/s", flush=True)

        from tarflow.pipelines.runtime import init_ray
        from tarflow.pipelines.tokenize import TokenizeConfig, run_tokenize

        init_ray(progress_bars=False)
        summary = run_tokenize(TokenizeConfig(input=os.path.join(work, "in"), output=os.path.join(work, "out"),
                                              tatok=ckpt, scales=scales, encode_batch_size=batch, dtype=dtype,
                                              device=device, progress_every_s=30))
        assert summary.samples_ok == n, summary.render()
        res.figure(end_to_end_images_per_s=summary.steady_images_per_s,
                   end_to_end_incl_startup_images_per_s=summary.images_per_s,
                   end_to_end_over_model_only=summary.steady_images_per_s / model_ips)
        print(f"end-to-end : {summary.steady_images_per_s:.1f} images/s steady "
              f"({summary.images_per_s:.1f} with start-up)")
        print(f"ratio end-to-end / model-only: {summary.steady_images_per_s / model_ips:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
