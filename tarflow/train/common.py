"""What the Ray Train loops share: optimiser and schedule, checkpoint state, resuming the data position.

A checkpoint is a folder: the model in the format its users load (a Hugging Face folder for the MLLM, the
reference `.pth` for the AR de-tokenizer) plus `trainer_state.pt` (optimiser, schedule, step, samples consumed
per worker, RNG), loadable with `torch.load(weights_only=True)`. Ray Train persists it to `storage_path`
(local or s3://) and hands the latest back to the workers after a failure or on a rerun.
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass

import torch

TRAINER_STATE = "trainer_state.pt"


@dataclass
class OptimConfig:
    lr: float = 5e-5  # the reference's MLLM recipe
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = 0.03
    total_steps: int = 1000
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    bf16: bool = True  # autocast on GPU; ignored on CPU

    def as_dict(self) -> dict:
        return asdict(self)


def cosine_with_warmup(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    warmup = int(round(cfg.warmup_ratio * cfg.total_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(cfg.total_steps, warmup))
    return opt, sched


def autocast(device: torch.device, bf16: bool):
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@dataclass
class TrainState:
    step: int = 0  # optimiser steps done
    samples_seen: int = 0  # rows this worker consumed from its data shard (skipped on resume)
    epoch: int = 0


def save_trainer_state(folder: str, opt, sched, state: TrainState, per_rank_samples: list[int]) -> None:
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": state.step,
                "epoch": state.epoch, "samples_seen": per_rank_samples,
                "torch_rng": torch.get_rng_state()}, os.path.join(folder, TRAINER_STATE))


def load_trainer_state(folder: str, opt, sched, rank: int) -> TrainState:
    blob = torch.load(os.path.join(folder, TRAINER_STATE), map_location="cpu", weights_only=True)
    opt.load_state_dict(blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    seen = blob["samples_seen"]
    return TrainState(step=int(blob["step"]), epoch=int(blob["epoch"]),
                      samples_seen=int(seen[rank] if rank < len(seen) else 0))


def gather_ints(value: int) -> list[int]:
    """Every worker's `value`, in rank order (one integer all-gather; [value] without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [int(value)]
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL gathers device tensors only
    out = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(out, torch.tensor([int(value)], dtype=torch.long, device=device))
    return [int(t) for t in out]


def report(metrics: dict, save_model, opt, sched, state: TrainState, checkpoint: bool) -> None:
    """ray.train.report from every worker; with `checkpoint`, rank 0 writes model + trainer state and attaches
    them (the samples each worker consumed are gathered first, so the data position resumes per worker)."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    if not checkpoint:
        ray.train.report(metrics)
        return
    seen = gather_ints(state.samples_seen)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            save_model(tmp)
            save_trainer_state(tmp, opt, sched, state, seen)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model
