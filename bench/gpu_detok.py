"""GPU benchmark of the AR de-tokenizer's batched generation (issue: >= 20 images/s per H200).

    python bench/gpu_detok.py            # H200: llama-abs-LP shape (632M), 729 condition tokens, 256 px
                                         # (256 VQ tokens), CFG 4, bf16, random weights
    python bench/gpu_detok.py --tiny     # any machine: a small model on CPU, the same measurements

Prints images/s and tokens/s for the eager static-KV-cache decoder and, on GPU, for the decode step compiled
with torch.compile (mode reduce-overhead: CUDA graphs). Writes JSON to --json or $OUT/gpu_detok.json.
Reference point (from the issue): a reference-style Hugging Face generate loop of this shape did 2.25
images/s at batch 128 on an H200.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]  # bench/tokenize.py shadows stdlib
sys.path.insert(0, os.path.dirname(_HERE))

from bench.common import write_results  # noqa: E402


def build(tiny: bool, device: str, dtype):
    import torch

    from tarflow.models.ar_detok import ARArgs, ARDetokenizer

    if tiny:
        a = ARArgs(n_layer=2, n_head=4, dim=64, vocab_size=64, cls_token_num=81, cond_dim=36, max_seq_len=16,
                   model_type="clip_cond")
    else:
        a = ARArgs(n_layer=30, n_head=20, dim=1280, vocab_size=16384, cls_token_num=729, cond_dim=1152,
                   max_seq_len=256, model_type="clip_cond")
    torch.manual_seed(0)
    return ARDetokenizer(a).to(device, dtype).eval()


def measure(model, cond, steps_fn, repeats: int) -> float:
    import torch

    sync = torch.cuda.synchronize if cond.is_cuda else (lambda: None)
    model.generate(cond, cfg_scale=4.0, step_fn=steps_fn, generator=None)  # warm-up / compile
    sync()
    t0 = time.time()
    for _ in range(repeats):
        model.generate(cond, cfg_scale=4.0, step_fn=steps_fn)
    sync()
    return (time.time() - t0) / repeats


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batch", type=int, default=None, help="images per generate call (128 GPU / 8 tiny)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build(args.tiny, device, dtype)
    B = args.batch or (8 if args.tiny else 128)
    n_tok = model.args.max_seq_len
    cond = torch.randn(B, model.args.cls_token_num, model.args.cond_dim, device=device, dtype=dtype)
    res = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": str(dtype), "batch": B,
           "tokens_per_image": n_tok, "cfg": 4.0, "tiny": args.tiny, "date": time.strftime("%Y-%m-%d")}
    variants = {"eager": None}
    if device == "cuda" and not args.no_compile:
        variants["compiled"] = torch.compile(model.decode_step, mode="reduce-overhead", dynamic=False)
    for name, fn in variants.items():
        try:
            s = measure(model, cond, fn, args.repeats)
        except Exception as e:  # a compile failure must not hide the eager figure
            res[f"{name}_error"] = f"{type(e).__name__}: {e}"[:500]
            print(f"{name}: failed: {res[f'{name}_error']}")
            continue
        res[f"{name}_images_per_s"] = B / s
        res[f"{name}_tokens_per_s"] = B * n_tok / s
        print(f"{name:9s}: {B / s:8.2f} images/s, {B * n_tok / s:10.1f} tokens/s (batch {B}, {s:.2f} s per batch)")
    write_results(res, args.json, "gpu_detok.json")


if __name__ == "__main__":
    main()
