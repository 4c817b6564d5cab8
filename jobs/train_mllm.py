"""Train the Tar MLLM on TA-Tok code shards with Ray Train (codes in: no JPEG is decoded, no SigLIP runs).

    ray job submit --working-dir . -- python jobs/train_mllm.py \
        --data s3://bucket/laion-tatok/ --base s3://models/Qwen2.5-1.5B-Instruct --tatok s3://models/ta_tok.pth \
        --storage-path s3://bucket/runs --name tar-1.5b --num-workers 8 --use-gpu --steps 20000

Tasks per row as the reference builds them (I2T 2 : T2I 4 : text-only 1 by default; text-only needs
`conversations` rows), a random pool scale per sample (default 1,1,2,3), samples packed into rows of
--max-length. Checkpoints are Hugging Face folders under STORAGE_PATH/NAME; rerunning the same command
resumes from the latest, data position included.
"""
from __future__ import annotations

import argparse
import json
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train_mllm.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", required=True,
                   help="tokenize outputs, folders of code shards, or Parquet files (optionally with `conversations`)")
    p.add_argument("--storage-path", required=True, help="Ray Train storage for runs and checkpoints (local or s3://)")
    p.add_argument("--name", default="tar-mllm", help="run name; rerun with the same name to resume [%(default)s]")
    start = p.add_mutually_exclusive_group()  # neither (and no --tatok): the RANDOM demo models
    start.add_argument("--base", help="base Qwen2 folder: Tar's vocabulary is added")
    start.add_argument("--resume-from", help="a Tar checkpoint folder to continue training")
    p.add_argument("--tatok", default=None, help="TA-Tok checkpoint: image-token rows start from its codebook")
    p.add_argument("--num-image-tokens", type=int, default=65536,
                   help="image tokens added to --base: the TA-Tok codebook size [%(default)s, Tar's]")
    p.add_argument("--task-mix", default="i2t=2,t2i=4,text=1", help="task weights [%(default)s]")
    p.add_argument("--scales", default="1,1,2,3", help="pool scales drawn per sample [%(default)s]")
    p.add_argument("--max-length", type=int, default=2048, help="packed row length in tokens [2048]")
    p.add_argument("--rows-per-step", type=int, default=1, help="packed rows per micro-batch per worker [1]")
    o = p.add_argument_group("optimisation (reference: lr 5e-5, cosine, 3%% warmup, bf16)")
    o.add_argument("--steps", type=int, default=1000)
    o.add_argument("--lr", type=float, default=5e-5)
    o.add_argument("--warmup-ratio", type=float, default=0.03)
    o.add_argument("--weight-decay", type=float, default=0.0)
    o.add_argument("--grad-accum", type=int, default=1)
    o.add_argument("--max-grad-norm", type=float, default=1.0)
    o.add_argument("--no-bf16", action="store_true", help="no bf16 autocast on GPU")
    r = p.add_argument_group("cluster")
    r.add_argument("--num-workers", type=int, default=1)
    r.add_argument("--use-gpu", action="store_true")
    r.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp",
                   help="ddp: a model copy per worker; fsdp: weights, gradients and optimiser state sharded "
                        "over the workers (models too big for one GPU with AdamW) [%(default)s]")
    r.add_argument("--cpus-per-worker", type=float, default=1.0, help="fractions work on small machines [1]")
    r.add_argument("--checkpoint-every", type=int, default=100)
    r.add_argument("--log-every", type=int, default=10, help="steps per metrics report, averaged over them [10]")
    r.add_argument("--stop-after-steps", type=int, default=None, help="end this run after N steps (resume later)")
    r.add_argument("--max-failures", type=int, default=1, help="worker failures to recover from [1]")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--address", default=None)
    p.add_argument("--summary-json", default=None)
    args = p.parse_args(argv)
    try:
        args.task_mix = {k: float(v) for k, v in (kv.split("=") for kv in args.task_mix.split(","))}
        args.scales = [int(s) for s in args.scales.split(",")]
    except ValueError:
        p.error("--task-mix is name=weight,... and --scales is comma-separated integers")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from tarflow.pipelines.runtime import init_ray, setup_logging
    from tarflow.train.common import OptimConfig
    from tarflow.train.mllm import MLLMTrainConfig, run_train_mllm

    setup_logging()
    if not (args.base or args.resume_from or args.tatok):  # no model arguments: the demo family
        import logging

        from tarflow.data.sample import demo_warning, ensure_demo_base, ensure_random_tatok
        from tarflow.models.tatok import TATok

        args.base, args.tatok = str(ensure_demo_base()), str(ensure_random_tatok())
        args.num_image_tokens = TATok.from_checkpoint(args.tatok).codebook_size
        logging.getLogger("tarflow.train").warning("%s", demo_warning("--base/--resume-from/--tatok", args.base))
    elif not (args.base or args.resume_from):
        print("error: give --base (a Qwen2 folder) or --resume-from (a Tar checkpoint)", file=sys.stderr)
        return 2
    cfg = MLLMTrainConfig(
        data=args.data, storage_path=args.storage_path, name=args.name, base=args.base,
        resume_from=args.resume_from, tatok=args.tatok,
        num_image_tokens=args.num_image_tokens, task_mix=args.task_mix, scales=args.scales,
        max_length=args.max_length, rows_per_step=args.rows_per_step,
        optim=OptimConfig(lr=args.lr, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
                          total_steps=args.steps, grad_accum=args.grad_accum, max_grad_norm=args.max_grad_norm,
                          bf16=not args.no_bf16),
        num_workers=args.num_workers, use_gpu=args.use_gpu, strategy=args.strategy,
        cpus_per_worker=args.cpus_per_worker,
        seed=args.seed, checkpoint_every=args.checkpoint_every, log_every=args.log_every,
        stop_after_steps=args.stop_after_steps,
        max_failures=args.max_failures)
    init_ray(args.address)
    result = run_train_mllm(cfg)
    if result.error:
        print(f"training failed: {result.error}", file=sys.stderr)
        return 1
    print(f"tarflow train_mllm: {result.metrics.get('step')} steps, last loss {result.metrics.get('loss'):.4f}; "
          f"checkpoint (Hugging Face folder): {result.checkpoint.path if result.checkpoint else None}")
    if args.summary_json:
        from tarflow.data import storage

        storage.write_bytes_atomic(args.summary_json, json.dumps(
            {"metrics": result.metrics, "checkpoint": result.checkpoint.path if result.checkpoint else None},
            default=str, indent=2).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
