"""The trainer core's parts: optimiser and schedule, how workers share a model (ModelParallel), the trainer
state in a checkpoint. The loop itself is tarflow.train.core.

`trainer_state.pt` (optimiser, schedule, step, epoch, rows consumed per worker; no RNG state: the loop reseeds
every step from (seed, rank, step)) sits beside the model in each checkpoint folder, loadable with
`torch.load(weights_only=True)`. Ray Train persists the folder to `storage_path` (local or s3://) and hands the
latest back to the workers after a failure or on a rerun.
"""
from __future__ import annotations

import os
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


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig):
    """AdamW over the trainable parameters, and transformers' cosine schedule with linear warmup (what the
    reference's HF Trainer runs: factor step / warmup during warmup, so the first step runs at lr 0, then a
    cosine from 1 to 0 at total_steps). A LambdaLR: its state (the step) resumes exactly."""
    from transformers import get_cosine_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, warmup_steps(cfg), cfg.total_steps)
    return opt, sched


def warmup_steps(cfg: OptimConfig) -> int:
    return int(round(cfg.warmup_ratio * cfg.total_steps))


def autocast(device: torch.device, bf16: bool):
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@dataclass
class TrainState:
    step: int = 0  # optimiser steps done
    samples_seen: int = 0  # rows this worker consumed from its data shard (skipped on resume)
    epoch: int = 0


def save_trainer_state(folder: str, optimizer_state: dict, sched, state: TrainState,
                       per_rank_samples: list[int]) -> None:
    torch.save({"optimizer": optimizer_state, "scheduler": sched.state_dict(), "step": state.step,
                "epoch": state.epoch, "samples_seen": per_rank_samples}, os.path.join(folder, TRAINER_STATE))


def load_trainer_state(folder: str, opt, sched, rank: int, parallel: ModelParallel | None = None) -> TrainState:
    blob = torch.load(os.path.join(folder, TRAINER_STATE), map_location="cpu", weights_only=True)
    (parallel or ModelParallel()).load_optimizer(opt, blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    # no RNG state: the loop reseeds every step from (seed, rank, step)
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


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


STRATEGIES = ("ddp", "fsdp")


class ModelParallel:
    """How the workers share a model: "ddp" (a whole copy on each; gradients all-reduced, via Ray Train's
    prepare_model) or "fsdp" (FSDP2: each of `layers` and then the whole model is sharded over the workers, so
    parameters, gradients and optimiser state take 1/N of the memory each; gathered to whole tensors only
    for checkpoints, which are therefore the same files as DDP's)."""

    def __init__(self, strategy: str = "ddp"):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown parallel strategy {strategy!r}; choose one of {STRATEGIES}")
        self.strategy, self.model = strategy, None

    def wrap(self, model: torch.nn.Module, layers=()) -> torch.nn.Module:
        import ray.train.torch
        import torch.distributed as dist

        if self.strategy == "ddp" or not (dist.is_available() and dist.is_initialized()):
            self.strategy = "ddp"  # a single process without a process group: nothing to shard over
            self.model = ray.train.torch.prepare_model(model)
            return self.model
        from torch.distributed.fsdp import fully_shard

        model.to(ray.train.torch.get_device())
        for layer in layers:  # one all-gather per layer in forward and backward, not one for the whole model
            fully_shard(layer)
        self.model = fully_shard(model)
        return self.model

    def micro_batch(self, sync: bool):
        """Context for a micro-batch's forward and backward: gradients are reduced across the workers only
        when `sync` (the last micro-batch of a step); the others accumulate locally."""
        import contextlib

        if self.strategy == "fsdp":
            self.model.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        if not sync and hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def full_state(self, opt) -> tuple[dict | None, dict]:
        """(model state or None, optimiser state) with whole tensors. None: the model saves its own weights
        (DDP: every rank has them). The optimiser state is keyed by parameter name whichever the strategy, so a
        checkpoint resumes under either. Under FSDP a collective; rank 0 gets the tensors, in CPU memory."""
        if self.model is None:  # a model not wrapped here keeps the optimiser's own format
            return None, opt.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(self.model, options=options) if self.strategy == "fsdp" else None
        return model_state, get_optimizer_state_dict(self.model, opt, options=options)

    def load_optimizer(self, opt, optimizer_state: dict) -> None:
        if self.model is None or not any(isinstance(k, str) for k in optimizer_state.get("state", {})):
            opt.load_state_dict(optimizer_state)  # keyed by position: saved by a model not wrapped here
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.model, opt, optimizer_state, options=StateDictOptions(full_state_dict=True))
