"""GPU benchmark of the AR de-tokenizer's batched generation (issue: >= 20 images/s per H200).

    python bench/gpu_detok.py            # H200: llama-abs-LP shape (632M), 729 condition tokens, 256 px
                                         # (256 VQ tokens), CFG 4, bf16, random weights
    python bench/gpu_detok.py --tiny     # any machine: a small model on CPU, the same measurements

Prints images/s and tokens/s for the eager static-KV-cache decoder and for the decode step compiled with
torch.compile (mode reduce-overhead: CUDA graphs; on CPU Dynamo's capture only). Writes JSON to --json or
$OUT/gpu_detok.json. Reference point (from the issue): a reference-style Hugging Face generate loop of this
shape did 2.25 images/s at batch 128 on an H200. bench/gpu_check.py runs the same measurement.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]  # bench/tokenize.py shadows stdlib
sys.path.insert(0, os.path.dirname(_HERE))

from bench.common import Budget, Results, compiler, device_name, results_path, timed  # noqa: E402


def build(tiny: bool, device: str, dtype):
    import torch

    from tarflow.models.ar_detok import ARArgs, ARDetokenizer

    if tiny:
        a = ARArgs(n_layer=2, n_head=4, dim=64, vocab_size=64, cls_token_num=81, cond_dim=36, max_seq_len=16,
                   model_type="clip_cond")
    else:  # llama-abs-LP (30 layers, 20 heads, dim 1280), 729 TA-Tok tokens in, 16 x 16 VQ tokens out (256 px)
        a = ARArgs(n_layer=30, n_head=20, dim=1280, vocab_size=16384, cls_token_num=729, cond_dim=1152,
                   max_seq_len=256, model_type="clip_cond")
    torch.manual_seed(0)
    return ARDetokenizer(a).to(device, dtype).eval()


def measure(model, cond, step_fn, repeats: int, budget: Budget | None = None) -> float:
    """Seconds per generate call (CFG 4): one warm-up call (compiles / captures graphs), then `repeats`
    calls, fewer when the budget runs out (at least one)."""
    model.generate(cond, cfg_scale=4.0, step_fn=step_fn)
    times = []
    for _ in range(repeats):
        times.append(timed(lambda: model.generate(cond, cfg_scale=4.0, step_fn=step_fn), cond.device))
        if budget is not None and not budget.fits(2 * times[-1]):
            break
    return sum(times) / len(times)


def detok_throughput(model, batch: int, res: Results, *, compile: bool = True, repeats: int = 2,
                     budget: Budget | None = None, compile_need_s: float = 0.0) -> None:
    """images/s and tokens/s of batched generation, eager and with the decode step compiled, into `res`."""
    import torch

    a = model.args
    dev, dtype = model.tok_embeddings.weight.device, model.tok_embeddings.weight.dtype
    cond = torch.randn(batch, a.cls_token_num, a.cond_dim, device=dev, dtype=dtype)
    n_tok = a.max_seq_len
    res.set(batch=batch, tokens_per_image=n_tok, condition_tokens=a.cls_token_num, cfg=4.0)
    variants = {"eager": lambda: None}
    if compile:
        variants["compiled"] = lambda: compiler(dev)(model.decode_step, mode="reduce-overhead", dynamic=False)
    for name, make_step in variants.items():
        s = res.attempt(name, lambda: measure(model, cond, make_step(), repeats, budget), budget=budget,
                        need_s=compile_need_s if name == "compiled" else 0.0)
        if s is None:
            continue
        res.figure(**{f"{name}_images_per_s": batch / s, f"{name}_tokens_per_s": batch * n_tok / s})
        print(f"{name:9s}: {batch / s:8.2f} images/s, {batch * n_tok / s:10.1f} tokens/s (batch {batch}, "
              f"{s:.2f} s per batch)", flush=True)


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
    res = Results("ar_detok", results_path(args.json, "gpu_detok.json"), device=device_name(device),
                  dtype=str(dtype), tiny=args.tiny, date=time.strftime("%Y-%m-%d"))
    model = build(args.tiny, device, dtype)
    detok_throughput(model, args.batch or (8 if args.tiny else 128), res, compile=not args.no_compile,
                     repeats=args.repeats)


if __name__ == "__main__":
    main()
