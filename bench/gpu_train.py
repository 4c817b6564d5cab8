"""GPU benchmark of MLLM training steps (issue: MFU >= 40% with packed sequences of 2048 on one H200).

    python bench/gpu_train.py          # H200: Tar-1.5B shape (Qwen2.5-1.5B, vocab 217206), random weights, bf16
    python bench/gpu_train.py --tiny   # any machine: a tiny Qwen2 with Tar's vocabulary, on CPU

Same synthetic samples (lengths like Tar's tasks: T2I/I2T with 729/169/81 image tokens plus text) trained two
ways in one run: packed into rows of 2048 (tarflow: positions restart, block-diagonal attention) and padded
per batch without packing (the reference's way). Prints useful (non-padding) tokens/s and model FLOPs
utilisation against 790 TFLOP/s (the bf16 matmul rate measured on the H200); writes JSON to --json or
$OUT/gpu_train.json.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]  # bench/tokenize.py shadows stdlib
sys.path.insert(0, os.path.dirname(_HERE))

from bench.common import write_results  # noqa: E402

PEAK_FLOPS = 790e12


def samples(n: int, seed: int = 0) -> list[tuple[list[int], list[int], int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        image = rng.choice([729, 729, 169, 81])
        text = rng.randrange(15, 120)
        ids = [rng.randrange(1000, 200000) for _ in range(image + text + 30)]
        out.append((ids, list(ids), rng.randrange(2)))
    return out


def padded(batch_samples, pad_id: int) -> dict:
    """The reference's batch: every sample its own row, padded to the longest (no packing)."""
    import numpy as np

    L = max(len(s[0]) for s in batch_samples)
    B = len(batch_samples)
    ids = np.full((B, L), pad_id)
    labels = np.full((B, L), -100)
    seg = np.full((B, L), -1)
    pos = np.zeros((B, L), dtype=np.int64)
    for b, (i, lab, _) in enumerate(batch_samples):
        ids[b, :len(i)], labels[b, :len(i)], seg[b, :len(i)], pos[b, :len(i)] = i, lab, 0, np.arange(len(i))
    return {"input_ids": ids, "labels": labels, "tasks": np.zeros_like(ids), "segments": seg,
            "position_ids": pos, "padding": float((seg < 0).mean())}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--steps", type=int, default=None, help="measured steps per variant (10 GPU / 3 tiny)")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--rows", type=int, default=None, help="packed rows per step (8 GPU / 1 tiny)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    import torch

    from bench.gpu_mllm import build
    from tarflow.train.mllm import _take_rows, packed_loss

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    model = build(args.tiny, device, torch.float32)  # fp32 master weights, bf16 autocast
    model.train()
    if device == "cuda":
        model.gradient_checkpointing_enable()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
    steps, rows = args.steps or (3 if args.tiny else 10), args.rows or (1 if args.tiny else 8)
    dev = torch.device(device)
    pool = samples(4000)
    res = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "params": n_params,
           "max_length": args.max_length, "rows": rows, "tiny": args.tiny, "date": time.strftime("%Y-%m-%d")}

    def run(make_batch, name):
        pending = list(pool)
        for i in range(steps + 1):  # the first step warms up
            if i == 1:
                if device == "cuda":
                    torch.cuda.synchronize()
                t0, tokens, pad = time.time(), 0, 0.0
            batch, pending = make_batch(pending)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                loss, _ = packed_loss(model, batch, dev)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= 1:
                tokens += int((batch["segments"] >= 0).sum())
                pad += batch["padding"]
        if device == "cuda":
            torch.cuda.synchronize()
        s = time.time() - t0
        res[f"{name}_tokens_per_s"] = tokens / s
        res[f"{name}_padding_fraction"] = pad / steps
        res[f"{name}_mfu"] = 6 * n_params * tokens / s / PEAK_FLOPS
        print(f"{name:7s}: {tokens / s:10.1f} useful tokens/s, padding {pad / steps:.2f}, "
              f"MFU {res[f'{name}_mfu'] * 100:.1f}% (6*N*tokens against 790 TFLOP/s)", flush=True)

    run(lambda pend: _take_rows(pend, rows, args.max_length, 0), "packed")
    per_batch = max(1, rows * args.max_length // 1000)  # about the same tokens per step, unpacked

    def padded_batch(pend):
        return padded(pend[:per_batch], 0), pend[per_batch:]

    run(padded_batch, "padded")
    write_results(res, args.json, "gpu_train.json")


if __name__ == "__main__":
    main()
