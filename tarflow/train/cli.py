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
import os
import sys
from typing import Sequence

from tarflow.train.common import OptimConfig


def _defaults(config_cls) -> dict:
    out = {}
    for f in dataclasses.fields(config_cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def add_common_args(p: argparse.ArgumentParser, config_cls, data_help: str):
    """The common flags, with `config_cls`'s (a TrainConfig subclass) defaults; returns the data group (for a
    trainer's own data flags). --data may be left out where the trainer has demo data (check_common_args'
    `demo_data`) or another data flag (--data-config)."""
    d = _defaults(config_cls)
    o: OptimConfig = d["optim"]
    g = data = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", default=None, help=data_help)
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


def check_common_args(p: argparse.ArgumentParser, args: argparse.Namespace, demo_data: Sequence[str] = ()) -> None:
    """Parse the common flags' values. No --data (and no --data-config, where a trainer has one): the first of
    the `demo_data` folders that exists (what `make demo` / `make run` write), else a usage error."""
    if args.data is None and not getattr(args, "data_config", None):
        found = [d for d in demo_data if os.path.isdir(d)]
        if not demo_data:
            p.error("--data is required")
        if not found:
            p.error(f"--data: not given, and no demo data in {' or '.join(demo_data)} (relative to {os.getcwd()}); "
                    "run `make demo` first (it writes out/demo/codes), or give --data")
        args.data = [found[0]]
        print(f"tarflow: no --data: using the demo data {found[0]}", file=sys.stderr)
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
    """A trainer job's main after parsing, through the drivers' one wrapper (tarflow.driver.run_driver): check
    everything on the driver before Ray starts (every problem on its own line, exit 2), then train and print the
    summary (also to --summary-json). A worker's error comes back as one line (its traceback in a log file,
    exit 1; a usage problem found by a worker, exit 2); SIGINT/SIGTERM print where the run stands and the
    checkpoint a rerun resumes from (exit 130/143)."""
    from tarflow.driver import run_driver
    from tarflow.pipelines.runtime import init_ray, setup_logging
    from tarflow.train.run import interrupted_line

    setup_logging()
    plan: dict = {}

    def check():
        plan["plan"] = preflight(cfg)

    return run_driver(lambda c: train(c, plan["plan"]), cfg, args.summary_json,
                      report=lambda summary: report_train_summary(summary, what),
                      job="train-" + "-".join(what.lower().split()), check=check,
                      start=lambda: init_ray(args.address, progress_bars=sys.stdout.isatty()),
                      interrupted_early=lambda: interrupted_line(cfg))


def report_train_summary(summary, what: str) -> int:
    """Print a trainer's summary; exit status 0 (rows and shards that could not be read are counted in the
    summary, not failures of the run; an interrupted run never gets here: run_driver says where it stopped)."""
    print(summary.render(what))
    return 0
