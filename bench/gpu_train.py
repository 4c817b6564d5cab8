"""GPU benchmark of MLLM training steps (issue: MFU >= 40% with packed sequences of 2048 on one H200).

    python bench/gpu_train.py          # H200: Tar-1.5B shape (Qwen2.5-1.5B, vocab 217206), random weights
    python bench/gpu_train.py --tiny   # any machine: a tiny Qwen2 with Tar's vocabulary, on CPU
    python bench/gpu_train.py --tatok [--tiny]   # a TA-Tok training step instead (images/s and MFU)
    python bench/gpu_train.py --diffusion [--tiny]   # the diffusion de-tokenizer's step (SANA 600M, 512 px)

A step as tarflow's MLLM trainer takes it (tarflow/train/mllm.py): fp32 weights under bf16 autocast,
packed_loss, AdamW (tarflow.train.common.make_optimizer), gradient clipping. The same synthetic samples
(lengths like Tar's tasks: T2I/I2T with 729/169/81 image tokens plus text) trained two ways in one run: packed
into rows of 2048 (tarflow: positions restart, block-diagonal attention) and padded per batch without packing
(the reference's way). Prints useful (non-padding) tokens/s and model FLOPs utilisation against the bf16
matmul rate measured in the same run; writes JSON to --json or $OUT/gpu_train.json. bench/gpu_check.py runs
the packed measurement.
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

from bench.common import Budget, Results, device_name, results_path, sync, timed  # noqa: E402


def samples(n: int, seed: int = 0, image_tokens=(729, 729, 169, 81)) -> list[tuple[list[int], list[int], int]]:
    """(ids, labels, task) like Tar's: an image of one of `image_tokens` lengths, 15-120 tokens of text, 30 of
    chat template; every token learned."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        image = rng.choice(image_tokens)
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


def matmul_peak(device, n: int = 8192, repeats: int = 10) -> tuple[float, str]:
    """FLOP/s of an n x n x n matrix product on `device` in the dtype training computes in there (bf16 on GPU
    under autocast; float32 on CPU, where the trainer does not autocast): the peak MFU is measured against.
    Returns (FLOP/s, dtype)."""
    import torch

    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    s = timed(lambda: [a @ b for _ in range(repeats)], device)
    return 2 * n**3 * repeats / s, str(dtype).removeprefix("torch.")


def model_flops(cfg, n_params: int, batch: dict) -> float:
    """Training FLOPs of a batch: 6 per parameter per token (forward and backward; the tied head counted once
    as the matmul it is) plus causal attention within each sample, 6 * layers * hidden * length^2."""
    import numpy as np

    seg = batch["segments"]
    tokens = int((seg >= 0).sum())
    attn = 0
    for row in seg:
        _, lengths = np.unique(row[row >= 0], return_counts=True)
        attn += int((lengths.astype(np.int64) ** 2).sum())
    return 6 * n_params * tokens + 6 * cfg.num_hidden_layers * cfg.hidden_size * attn


def train_throughput(model, make_batch, pool, steps: int, res: Results, tag: str, peak: float,
                     budget: Budget | None = None) -> None:
    """Useful tokens/s and MFU of `steps` training steps (after one warm-up step), as the trainer takes them;
    fewer steps when the budget runs out (at least one). Figures go into `res` under `tag`."""
    import torch

    from tarflow.train.common import OptimConfig, autocast, make_optimizer
    from tarflow.train.mllm import packed_loss

    dev = next(model.parameters()).device
    n_params = sum(p.numel() for p in model.parameters())
    optim = OptimConfig()
    opt, sched = make_optimizer(model, optim)
    model.train()
    pending = list(pool)

    def step():
        nonlocal pending
        batch, pending = make_batch(pending)
        with autocast(dev, optim.bf16):
            loss, _ = packed_loss(model, batch, dev)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return batch

    warm = timed(step, dev)
    tokens, flops, pad, s, done = 0, 0.0, 0.0, 0.0, 0
    while done < steps:
        t0 = time.perf_counter()
        batch = step()
        sync(dev)
        s += time.perf_counter() - t0
        done += 1
        tokens += int((batch["segments"] >= 0).sum())
        flops += model_flops(model.config, n_params, batch)
        pad += batch["padding"]
        if budget is not None and not budget.fits(2 * s / done):
            break
    res.figure(**{f"{tag}_tokens_per_s": tokens / s, f"{tag}_step_seconds": s / done,
                  f"{tag}_padding_fraction": pad / done, f"{tag}_mfu": flops / s / peak,
                  f"{tag}_warmup_step_seconds": warm})
    res.set(**{f"{tag}_steps": done, "params": n_params, "rows_shape": list(batch["input_ids"].shape)})
    print(f"{tag}: {tokens / s:10.1f} useful tokens/s, {s / done:.3f} s per step, padding {pad / done:.2f}, "
          f"MFU {flops / s / peak * 100:.1f}% (against {peak / 1e12:.3g} TFLOP/s matmul, measured)",
          flush=True)


def tatok_train_throughput(tiny: bool, device: str, steps: int, res: Results, peak: float, batch: int | None = None,
                           budget: Budget | None = None) -> None:
    """Images/s and MFU of TA-Tok training steps as tarflow/train/tatok.py takes them: the frozen teacher's pooled
    features, the student's forward (STE), 1 - cos + relative MSE + 0.25 commitment + 1.0 codebook, AdamW,
    clipping; fp32 weights under bf16 autocast on GPU; the pool scale cycling 1, 2, 3. Real shape: so400m/14-384
    teacher and student (26 of 27 layers run), K = 65,536, D = 1,536, decoder depth 3; random weights. FLOPs are
    counted by torch's FlopCounterMode on one step of each scale (matmuls, convolutions, attention)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from tarflow.models.tatok import SIGLIP2_SO400M_384, ScaleLayer, TATok, TATokArgs, VisionConfig, reference_args
    from tarflow.models.tatok_train import frozen_teacher, rec_distances
    from tarflow.train.common import OptimConfig, autocast, make_optimizer

    enc = VisionConfig(hidden_size=36, intermediate_size=144, num_hidden_layers=2, num_attention_heads=4,
                       image_size=84, patch_size=14) if tiny else SIGLIP2_SO400M_384
    K, D = (256, 32) if tiny else (65536, 1536)
    B = batch or (8 if tiny else 32)
    raw = reference_args(enc, teacher="google/siglip2-so400m-patch14-384", bottleneck_dim=D, codebook_size=K)
    torch.manual_seed(0)
    with torch.device(device):  # "meta": the FLOPs are counted, nothing computed or allocated
        model = TATok(TATokArgs.from_ckpt_args(raw), enc)
        model.freeze_for_training()
        teacher = frozen_teacher(model.encoder, model.n_encoder_layers)
        scale_layer = ScaleLayer()
    optim = OptimConfig()
    opt, sched = make_optimizer(model, optim)
    model.train()
    x = torch.rand(B, 3, enc.image_size, enc.image_size, device=device)
    dev = torch.device(device)

    def step(s: int):
        with autocast(dev, optim.bf16):
            with torch.no_grad():
                target = TATok.pool(teacher(scale_layer(x), model.n_encoder_layers), s)
            out = model(x, s)
            cos, mse = rec_distances(out["rec"], target)
            loss = cos + mse + 0.25 * out["commitment"] + out["codebook"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    if device == "meta":
        flops = {}
        for s in (1, 2, 3):
            with FlopCounterMode(display=False) as fc, autocast(dev, False):
                with torch.no_grad():
                    target = TATok.pool(teacher(scale_layer(x), model.n_encoder_layers), s)
                out = model(x, s)
                cos, mse = rec_distances(out["rec"], target)
                (cos + mse + 0.25 * out["commitment"] + out["codebook"]).backward()
            flops[s] = fc.get_total_flops()
        res.set(tatok_batch=B, tatok_flops_per_step={str(k): v for k, v in flops.items()})
        res.figure(tatok_tflop_per_image=sum(flops.values()) / 3 / B / 1e12)
        print(f"tatok: {sum(flops.values()) / 3 / B / 1e12:.3f} TFLOP per image (mean over scales 1, 2, 3; batch {B})")
        return
    flops = {}
    for s in (1, 2, 3):  # the warm-up steps, counted
        with FlopCounterMode(display=False) as fc:
            step(s)
        flops[s] = fc.get_total_flops()
    sync(dev)
    total, t, done = 0.0, 0.0, 0
    while done < steps:
        s = 1 + done % 3
        t0 = time.perf_counter()
        step(s)
        sync(dev)
        t += time.perf_counter() - t0
        total += flops[s]
        done += 1
        if budget is not None and not budget.fits(2 * t / done):
            break
    res.figure(tatok_images_per_s=B * done / t, tatok_step_seconds=t / done, tatok_mfu=total / t / peak,
               tatok_seconds_per_image=t / (B * done))
    res.set(tatok_steps=done, tatok_batch=B, tatok_shape={"image": enc.image_size, "hidden": enc.hidden_size,
                                                          "layers": enc.num_hidden_layers, "K": K, "D": D},
            tatok_flops_per_step={str(k): v for k, v in flops.items()},
            tatok_trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad))
    print(f"tatok: {B * done / t:8.2f} images/s ({t / (B * done) * 1e3:.1f} ms per image), {t / done:.3f} s per step "
          f"of {B}, MFU {total / t / peak * 100:.1f}% (against {peak / 1e12:.3g} TFLOP/s matmul, measured)",
          flush=True)


# A tiny SANA for --tiny (CPU): the same module types, 2 layers of width 64, 4 x 8 x 8 latents, 9 condition tokens
TINY_SANA = dict(in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=16, num_layers=2,
                 num_cross_attention_heads=4, cross_attention_head_dim=16, cross_attention_dim=64,
                 caption_channels=36, mlp_ratio=2.5, sample_size=8, patch_size=1)


def diffusion_throughput(device, tiny: bool, steps: int, batch: int, peak: float, res: Results,
                         cond_tokens: int | None = None, budget: Budget | None = None) -> None:
    """Images/s and MFU of the diffusion de-tokenizer's training step as tarflow.train.diffusion_detok takes it:
    SANA 600M (tarflow.models.diffusion_detok.SANA_600M) on 512 px latents (32 x 16 x 16), fp32 weights under
    bf16 autocast, SANA's flow-matching loss (FlowMatching: logit-normal timesteps, shift 3), AdamW, clipping.
    The condition is random rec features of Tar's size (729 x 1152, TA-Tok scale 1): the frozen TA-Tok decode
    that makes it in training is not part of the step measured here. FLOPs are counted, not estimated:
    torch.utils.flop_counter (matmuls, convolutions, attention; SANA's linear attention is
    matmuls) of one forward, x3 for forward and backward, so MFU = FLOPs per step / step time / the measured bf16
    matmul rate."""
    import torch
    from diffusers import SanaTransformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    from tarflow.models.diffusion_detok import SANA_600M
    from tarflow.train.common import OptimConfig, autocast, make_optimizer
    from tarflow.train.diffusion_detok import FlowMatching

    config = TINY_SANA if tiny else SANA_600M
    n_cond = cond_tokens or (9 if tiny else 729)
    torch.manual_seed(0)
    model = SanaTransformer2DModel(**config).to(device)  # fp32 weights under bf16 autocast, as the trainer
    n_params = sum(p.numel() for p in model.parameters())
    optim = OptimConfig()
    opt, sched = make_optimizer(model, optim)
    objective = FlowMatching(flow_shift=3.0)
    side, c = config["sample_size"], config["in_channels"]
    x0 = torch.randn(batch, c, side, side, device=device)  # scaled latents: unit variance, as SANA's
    cond = torch.randn(batch, n_cond, config["caption_channels"], device=device)
    mask = torch.ones(batch, n_cond, dtype=torch.long, device=device)
    model.train()

    def step():
        with autocast(torch.device(device), optim.bf16):
            loss = objective.loss(model, x0, cond, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    warm = timed(step, device)
    # the forward's FLOPs, counted; training = 3x (backward twice the forward, the convention of the MLLM's 6 per
    # parameter per token): counting the backward itself overcounts depthwise convolutions (groups ignored by
    # torch's convolution_backward formula: 15x the step's true FLOPs on the tiny model, measured)
    with torch.no_grad(), autocast(torch.device(device), optim.bf16), FlopCounterMode(display=False) as counter:
        objective.loss(model, x0, cond, mask)
    flops = 3 * counter.get_total_flops()
    s, done = 0.0, 0
    while done < steps:
        s += timed(step, device)
        done += 1
        if budget is not None and not budget.fits(2 * s / done):
            break
    res.figure(diffusion_images_per_s=batch * done / s, diffusion_step_seconds=s / done,
               diffusion_mfu=flops / (s / done) / peak, diffusion_warmup_step_seconds=warm,
               diffusion_flops_per_image=flops / batch)
    res.set(diffusion_steps=done, diffusion_params=n_params, diffusion_batch=batch, diffusion_cond_tokens=n_cond,
            diffusion_latents=[c, side, side])
    print(f"diffusion de-tokenizer ({n_params / 1e6:.0f}M, latents {c}x{side}x{side}, {n_cond} condition tokens, "
          f"batch {batch}): {batch * done / s:8.1f} images/s, {s / done:.3f} s per step, MFU "
          f"{flops / (s / done) / peak * 100:.1f}% (against {peak / 1e12:.3g} TFLOP/s matmul, measured)", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--steps", type=int, default=None, help="measured steps per variant (10 GPU / 3 tiny)")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--rows", type=int, default=None, help="packed rows per step (8 GPU / 1 tiny)")
    p.add_argument("--json", default=None)
    p.add_argument("--tatok", action="store_true",
                   help="measure a TA-Tok training step instead (so400m teacher/student, K 65536, D 1536)")
    p.add_argument("--tatok-batch", type=int, default=None, help="images per TA-Tok step (32 GPU / 8 tiny)")
    p.add_argument("--tatok-count-flops", action="store_true",
                   help="only count a TA-Tok step's FLOPs per image (on the meta device: any machine, seconds)")
    p.add_argument("--diffusion", action="store_true",
                   help="measure the diffusion de-tokenizer's step instead (SANA 600M, 512 px latents, bf16 "
                        "autocast); JSON to --json or $OUT/gpu_train_diffusion.json")
    p.add_argument("--diffusion-batch", type=int, default=None, help="images per step (64 GPU / 2 tiny)")
    args = p.parse_args()
    if args.diffusion:
        return diffusion_main(args)
    import torch

    from bench.gpu_mllm import build
    from tarflow.train.mllm import _take_rows

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if args.tatok and args.tatok_count_flops:
        res = Results("tatok_train_flops", results_path(args.json, "gpu_train_tatok_flops.json"), tiny=args.tiny)
        tatok_train_throughput(args.tiny, "meta", 0, res, 0.0, args.tatok_batch)
        return
    steps, rows = args.steps or (3 if args.tiny else 10), args.rows or (1 if args.tiny else 8)
    res = Results("mllm_train_step", results_path(args.json, "gpu_train.json"), device=device_name(device),
                  max_length=args.max_length, rows=rows, tiny=args.tiny, date=time.strftime("%Y-%m-%d"))
    peak, peak_dtype = matmul_peak(device, 8192 if device == "cuda" else 512)
    res.figure(matmul_peak_tflops=peak / 1e12)
    res.set(matmul_dtype=peak_dtype)
    if args.tatok:
        res.set(name="tatok_train_step")
        tatok_train_throughput(args.tiny, device, steps, res, peak, args.tatok_batch)
        return
    model = build(args.tiny, device, torch.float32)  # fp32 weights under bf16 autocast, as the trainer
    pool = samples(4000)
    train_throughput(model, lambda pend: _take_rows(pend, rows, args.max_length, 0), pool, steps, res, "packed",
                     peak)
    per_batch = max(1, rows * args.max_length // 1000)  # about the same tokens per step, unpacked
    train_throughput(model, lambda pend: (padded(pend[:per_batch], 0), pend[per_batch:]), pool, steps, res,
                     "padded", peak)


def diffusion_main(args) -> None:
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    steps, batch = args.steps or (3 if args.tiny else 10), args.diffusion_batch or (2 if args.tiny else 64)
    res = Results("diffusion_detok_train_step", results_path(args.json, "gpu_train_diffusion.json"),
                  device=device_name(device), tiny=args.tiny, date=time.strftime("%Y-%m-%d"))
    peak, peak_dtype = matmul_peak(device, 8192 if device == "cuda" else 512)
    res.figure(matmul_peak_tflops=peak / 1e12)
    res.set(matmul_dtype=peak_dtype)
    diffusion_throughput(device, args.tiny, steps, batch, peak, res)


if __name__ == "__main__":
    main()
