"""Train (or fine-tune) Tar's AR de-tokenizer on Ray Train: TA-Tok codes -> pixel VQ-16 codes.

Make the training data with the tokenize job and --vq (the VQ codes at the de-tokenizer's resolution), then:

    ray job submit --working-dir . -- python jobs/train_ar_detok.py \\
        --data s3://bucket/laion-tatok/ --tatok s3://models/ta_tok.pth --scale 1 \\
        --init s3://models/ar_dtok_lp_256px.pth --num-workers 8 --use-gpu --batch-size 32 --steps 20000 \\
        --storage-path s3://bucket/train --name ar-detok-ft --output s3://bucket/models/ar_dtok_ft.pth

The condition is the frozen TA-Tok decoder's rec features of the stored codes; the target the stored VQ codes;
teacher-forced cross-entropy with condition dropout (dropped rows get the all-zero condition, as CFG samples).
Checkpoints (reference-format ar_dtok.pth + optimiser state) go to --storage-path/--name every
--checkpoint-every steps; rerunning the same command resumes from the latest one (data position included),
and Ray Train retries failed workers (--max-failures). Bad rows (missing codes, wrong lengths, codes out of
range) are skipped and counted. At the end the model is copied to --output, loadable by
tarflow.models.ar_detok.ARDetokenizer.from_checkpoint (and by the reference).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys


def parse_args(argv=None) -> argparse.Namespace:
    from tarflow.models.ar_detok import PRESETS

    p = argparse.ArgumentParser(prog="train_ar_detok.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", nargs="+", required=True,
                   help="tokenize job outputs made with --vq (their finished shards), folders of code shards, or "
                        "code shard files; local or s3://")
    d.add_argument("--tatok", default=None,
                   help="the TA-Tok checkpoint that made the codes (its decoder, frozen, makes the condition). "
                        "With no model argument at all: the RANDOM demo TA-Tok and AR de-tokenizer (`make demo`)")
    d.add_argument("--scale", type=int, default=1,
                   help="condition on the tatok_s{scale} codes (1 -> 729, 2 -> 169, 3 -> 81 tokens) [%(default)s]")
    d.add_argument("--vq-column", default=None, help="the VQ codes column (default: the shards' own, e.g. vq16_256)")
    d.add_argument("--shuffle-buffer", type=int, default=1024,
                   help="rows in each worker's local shuffle buffer, seeded by --seed and the epoch; 0 = file "
                        "order [%(default)s]")
    m = p.add_argument_group("model (one of --init, --preset, or --n-layer/--n-head/--dim)")
    m.add_argument("--init", default=None, help="AR de-tokenizer checkpoint to fine-tune (ar_dtok_*.pth)")
    m.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="size of a new model (vocab = VQ codebook, cond_dim = TA-Tok hidden size, cls_token_num "
                        "= TA-Tok tokens at --scale, max_seq_len = VQ tokens, all from the data)")
    m.add_argument("--n-layer", type=int, default=None, help="new model: layers (overrides the preset's)")
    m.add_argument("--n-head", type=int, default=None, help="new model: attention heads")
    m.add_argument("--dim", type=int, default=None, help="new model: width")
    m.add_argument("--cond-dropout", type=float, default=None,
                   help="probability that a row trains with the null (all-zero) condition, which CFG needs "
                        "(default: the model's class_dropout_prob, 0.1 in the reference)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=1000, help="optimiser steps in all [%(default)s]")
    o.add_argument("--batch-size", type=int, default=32, help="rows per worker per micro-batch [%(default)s]")
    o.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step [%(default)s]")
    o.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (AdamW) [%(default)s]")
    o.add_argument("--weight-decay", type=float, default=0.05, help="[%(default)s]")
    o.add_argument("--betas", default="0.9,0.95", help="AdamW betas [%(default)s]")
    o.add_argument("--warmup-ratio", type=float, default=0.03,
                   help="linear warmup as a fraction of --steps, then cosine to 0 [%(default)s]")
    o.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping; 0 = off [%(default)s]")
    o.add_argument("--no-bf16", action="store_true", help="float32 on GPU (default: bf16 autocast; CPU: float32)")
    o.add_argument("--seed", type=int, default=0, help="weights of a new model, dropout, shuffling [%(default)s]")
    r = p.add_argument_group("run, checkpoints and output")
    r.add_argument("--name", default="ar-detok", help="run name; rerunning a name resumes it [%(default)s]")
    r.add_argument("--storage-path", default="out/train-ar-detok",
                   help="where Ray Train keeps checkpoints (local or s3://) [%(default)s]")
    r.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints [%(default)s]")
    r.add_argument("--keep-checkpoints", type=int, default=2, help="latest checkpoints kept [%(default)s]")
    r.add_argument("--stop-at-step", type=int, default=None,
                   help="end this run after this step (checkpointed; the schedule still spans --steps); rerun to "
                        "continue")
    r.add_argument("--output", default=None, help="write the final model here (.pth, local or s3://)")
    r.add_argument("--log-every", type=int, default=10, help="steps between log lines [%(default)s]")
    w = p.add_argument_group("resources")
    w.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a private local Ray)")
    w.add_argument("--num-workers", type=int, default=1, help="training workers (one GPU each) [%(default)s]")
    w.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    w.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per worker (may be fractional)")
    w.add_argument("--max-failures", type=int, default=3, help="Ray Train retries after a failure [%(default)s]")
    p.add_argument("--summary-json", default=None, help="also write the final summary (with per-step metrics) here")
    args = p.parse_args(argv)
    try:
        args.betas = tuple(float(b) for b in args.betas.split(","))
    except ValueError:
        args.betas = ()
    if len(args.betas) != 2:
        p.error("--betas takes two comma-separated numbers, e.g. 0.9,0.95")
    sizes = (args.n_layer, args.n_head, args.dim)
    if args.init and (args.preset or any(v is not None for v in sizes)):
        p.error("--init fine-tunes a checkpoint as it is: drop --preset/--n-layer/--n-head/--dim")
    if args.tatok is None and not args.init and not args.preset and all(v is None for v in sizes):
        return args  # the demo models (main)
    if args.tatok is None:
        p.error("--tatok is required with --init/--preset/--n-layer (the TA-Tok that made the codes)")
    if not args.init and not args.preset and None in sizes:
        p.error("give --init CHECKPOINT, --preset NAME, or all of --n-layer/--n-head/--dim")
    return args


def config_from_args(args):
    from tarflow.train.ar_detok import ARTrainConfig
    from tarflow.train.common import OptimConfig

    return ARTrainConfig(
        data=args.data, tatok=args.tatok, scale=args.scale, vq_column=args.vq_column, init=args.init,
        preset=args.preset, n_layer=args.n_layer, n_head=args.n_head, dim=args.dim, output=args.output,
        name=args.name, storage_path=args.storage_path, num_workers=args.num_workers, use_gpu=args.use_gpu,
        cpus_per_worker=args.cpus_per_worker, batch_size=args.batch_size, cond_dropout=args.cond_dropout,
        seed=args.seed, shuffle_buffer=args.shuffle_buffer, checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints, stop_at_step=args.stop_at_step, max_failures=args.max_failures,
        log_every=args.log_every,
        optim=OptimConfig(lr=args.lr, weight_decay=args.weight_decay, betas=args.betas,
                          warmup_ratio=args.warmup_ratio, total_steps=args.steps, grad_accum=args.grad_accum,
                          max_grad_norm=args.max_grad_norm, bf16=not args.no_bf16))


def main(argv=None) -> int:
    args = parse_args(argv)
    from tarflow.models.checkpoint import CheckpointError
    from tarflow.pipelines.runtime import init_ray, setup_logging
    from tarflow.train.ar_detok import run_train

    setup_logging()
    log = logging.getLogger("tarflow.train.ar_detok")
    if args.tatok is None:  # no model arguments: the demo TA-Tok and AR de-tokenizer
        from tarflow.data.sample import demo_warning, ensure_demo_ar_detok, ensure_random_tatok

        args.tatok, args.init = str(ensure_random_tatok()), str(ensure_demo_ar_detok())
        log.warning("%s", demo_warning("--tatok/--init", args.init))
    init_ray(args.address, progress_bars=False)
    try:
        summary = run_train(config_from_args(args))
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 2
    print(summary.render())
    if args.summary_json:
        from dataclasses import asdict

        from tarflow.data import storage

        storage.write_bytes_atomic(args.summary_json, json.dumps(asdict(summary), indent=2).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
