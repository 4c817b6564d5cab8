"""The flags every trainer has, parsed in one place: same names, same meaning, each trainer's own defaults.

    p = argparse.ArgumentParser(...)
    add_common_args(p, ARTrainConfig)          # data, run, optimisation, cluster flags
    ...the trainer's own flags...
    args = p.parse_args(argv); check_common_args(p, args)
    cfg = ARTrainConfig(**common_kwargs(args), ...the trainer's own...)
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from tarflow.train.common import OptimConfig


def _defaults(config_cls) -> dict:
    out = {}
    for f in dataclasses.fields(config_cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def add_common_args(p: argparse.ArgumentParser, config_cls, data_help: str, data_required: bool = True):
    """The common flags, with `config_cls`'s (a TrainConfig subclass) defaults; returns the data group (for a
    trainer's own data flags; `data_required` False when one of them can stand for --data)."""
    d = _defaults(config_cls)
    o: OptimConfig = d["optim"]
    g = data = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", required=data_required, help=data_help)
    g.add_argument("--shuffle-buffer", type=int, default=d["shuffle_buffer"],
                   help="rows in each worker's local shuffle buffer, seeded by --seed and the epoch; 0 = file "
                        "order [%(default)s]")
    g = p.add_argument_group("run and checkpoints (rerunning the same --name and --storage-path resumes the run "
                             "from its latest checkpoint, data position included; on other data it is refused)")
    g.add_argument("--name", default=d["name"], help="run name [%(default)s]")
    g.add_argument("--storage-path", default=d["storage_path"],
                   help="Ray Train's storage for runs and checkpoints, local or s3:// [%(default)s]")
    g.add_argument("--checkpoint-every", type=int, default=d["checkpoint_every"],
                   help="steps between checkpoints; one is also written at the end [%(default)s]")
    g.add_argument("--keep-checkpoints", type=int, default=d["keep_checkpoints"],
                   help="latest checkpoints kept in storage (older ones are deleted) [%(default)s]")
    g.add_argument("--log-every", type=int, default=d["log_every"],
                   help="steps per log line and metrics report, averaged over them [%(default)s]")
    g.add_argument("--stop-at-step", type=int, default=None,
                   help="end this run once this step is done (absolute, counted from the run's first step across "
                        "resumes; checkpointed; the schedule still spans --steps); rerun without it to continue")
    g.add_argument("--summary-json", default=None, help="also write the final summary (per-step metrics) here")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=o.total_steps,
                   help="optimiser steps of the whole run; the schedule spans them [%(default)s]")
    g.add_argument("--lr", type=float, default=o.lr, help="peak learning rate (AdamW) [%(default)s]")
    g.add_argument("--warmup-ratio", type=float, default=o.warmup_ratio,
                   help="linear warmup as a fraction of --steps, then a cosine to 0 (transformers' "
                        "get_cosine_schedule_with_warmup) [%(default)s]")
    g.add_argument("--weight-decay", type=float, default=o.weight_decay, help="[%(default)s]")
    g.add_argument("--betas", default=",".join(str(b) for b in o.betas), help="AdamW betas [%(default)s]")
    g.add_argument("--grad-accum", type=int, default=o.grad_accum, help="micro-batches per step [%(default)s]")
    g.add_argument("--max-grad-norm", type=float, default=o.max_grad_norm,
                   help="gradient clipping; 0 = off [%(default)s]")
    g.add_argument("--no-bf16", action="store_true", help="float32 on GPU (default: bf16 autocast; CPU: float32)")
    g.add_argument("--seed", type=int, default=d["seed"], help="initial weights, dropout, shuffling [%(default)s]")
    g = p.add_argument_group("cluster")
    g.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a private local Ray)")
    g.add_argument("--num-workers", type=int, default=d["num_workers"],
                   help="training workers (one GPU each with --use-gpu) [%(default)s]")
    g.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    g.add_argument("--cpus-per-worker", type=float, default=d["cpus_per_worker"],
                   help="CPUs per worker; fractions work on small machines [%(default)s]")
    g.add_argument("--strategy", choices=("ddp", "fsdp"), default=d["strategy"],
                   help="ddp: a model copy per worker; fsdp: weights, gradients and optimiser state sharded over "
                        "the workers (models too big for one GPU with AdamW); checkpoints are the same files "
                        "either way, so a run resumes under the other [%(default)s]")
    g.add_argument("--max-failures", type=int, default=d["max_failures"],
                   help="worker failures Ray Train recovers from, restarting at the latest checkpoint "
                        "[%(default)s]")
    return data


def check_common_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    try:
        args.betas = tuple(float(b) for b in args.betas.split(","))
    except ValueError:
        args.betas = ()
    if len(args.betas) != 2:
        p.error("--betas takes two comma-separated numbers, e.g. 0.9,0.95")


def common_kwargs(args: argparse.Namespace) -> dict:
    """TrainConfig fields from the common flags."""
    return dict(
        data=args.data or [], storage_path=args.storage_path, name=args.name, strategy=args.strategy,
        optim=OptimConfig(lr=args.lr, weight_decay=args.weight_decay, betas=args.betas,
                          warmup_ratio=args.warmup_ratio, total_steps=args.steps, grad_accum=args.grad_accum,
                          max_grad_norm=args.max_grad_norm, bf16=not args.no_bf16),
        num_workers=args.num_workers, use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker, seed=args.seed,
        shuffle_buffer=args.shuffle_buffer, checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints, log_every=args.log_every, stop_at_step=args.stop_at_step,
        max_failures=args.max_failures)


def run_trainer(preflight, train, cfg, args, what: str) -> int:
    """A trainer job's main after parsing: check everything on the driver before Ray starts (every problem
    on its own line, exit 2), then train and print the summary (also to --summary-json)."""
    import json
    import logging

    from tarflow.data import storage
    from tarflow.models.checkpoint import CheckpointError
    from tarflow.pipelines.runtime import init_ray, setup_logging
    from tarflow.preflight import UsageError

    setup_logging()
    try:
        plan = preflight(cfg)
    except UsageError as e:
        for line in e.lines:
            print(f"error: {line}", file=sys.stderr)
        return 2
    init_ray(args.address, progress_bars=sys.stdout.isatty())
    try:
        summary = train(cfg, plan)
    except (UsageError, CheckpointError, FileNotFoundError) as e:  # found by a worker: a usage problem still
        logging.getLogger("tarflow.train").error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.render(what))
    if args.summary_json:
        storage.write_bytes_atomic(args.summary_json, json.dumps(summary.as_dict(), indent=2, default=str).encode())
    return 0
