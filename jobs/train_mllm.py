"""Train the Tar MLLM on TA-Tok code shards with Ray Train (codes in: no JPEG is decoded, no SigLIP runs).

    ray job submit --working-dir . -- python jobs/train_mllm.py \\
        --data s3://bucket/laion-tatok/ --base s3://models/Qwen2.5-1.5B-Instruct --tatok s3://models/ta_tok.pth \\
        --storage-path s3://bucket/runs --name tar-1.5b --num-workers 8 --use-gpu --steps 20000

Tasks per row as the reference builds them (caption rows: I2T 2 : T2I 4, text-only conversations 1 by default;
conversations with images read and written as they are: I2I, TI2I, multi-image), a random pool scale per sample
(default 1,1,2,3), samples packed into rows of --max-length. `--data-config mix.yaml` draws from several sources
by ratio (the reference's data_demo.yaml shape). Checkpoints are Hugging Face folders (in the base's dtype) under
STORAGE_PATH/NAME, the latest --keep-checkpoints of them kept; rerunning the same command resumes from the latest, data position included.
"""
from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    from tarflow.data.sample import DEMO_CODES, RUN_CODES
    from tarflow.train.cli import add_common_args, check_common_args
    from tarflow.train.mllm import MLLMTrainConfig

    p = argparse.ArgumentParser(prog="train_mllm.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    data = add_common_args(p, MLLMTrainConfig,
                           data_help="tokenize outputs (code shards or conversation code shards), folders of them, "
                                     "or Parquet files (optionally with `conversations`); local or s3://; one "
                                     "source (or --data-config). Default: what `make demo` (out/demo/codes) or "
                                     "`make run` (out/tokenize-sample) writes")
    data.add_argument("--data-config", default=None,
                      help="a mix file instead of --data, in the shape of the reference's data_demo.yaml: "
                           "`datasets:` [{paths (or json_path): [...], ratio, name}]; samples drawn per source by "
                           "ratio (see README, 'Training on Tar's corpora')")
    m = p.add_argument_group("model (one of --base or --resume-from; none of them and no --tatok: the RANDOM "
                             "demo models)")
    start = m.add_mutually_exclusive_group()
    start.add_argument("--base", help="base Qwen2 folder (local or s3://): Tar's vocabulary is added; a Tar folder "
                                      "is continued from as it is")
    start.add_argument("--resume-from", help="a Tar checkpoint folder to continue training (local or s3://)")
    m.add_argument("--tatok", default=None, help="the TA-Tok that made the codes: image-token rows start from its "
                                                 "codebook, and every code shard must come from it")
    m.add_argument("--num-image-tokens", type=int, default=65536,
                   help="image tokens added to --base: the TA-Tok codebook size [%(default)s, Tar's]")
    s = p.add_argument_group("samples")
    s.add_argument("--task-mix", default="i2t=2,t2i=4,text=1",
                   help="share of samples per task: a caption row is I2T or T2I by the i2t:t2i weights, and "
                        "text-only `conversations` rows are kept so that they make text/(all) of the samples "
                        "(all of them when fewer; with --data-config the ratios set the shares); a conversation task "
                        "(i2t, t2i, i2i, ti2i, multi_image, text) of weight 0 is left out [%(default)s]")
    s.add_argument("--scales", default="1,1,2,3", help="pool scales drawn per sample [%(default)s]")
    s.add_argument("--max-length", type=int, default=2048, help="packed row length in tokens [%(default)s]")
    s.add_argument("--rows-per-step", type=int, default=1, help="packed rows per micro-batch per worker [%(default)s]")
    args = p.parse_args(argv)
    if args.data and args.data_config:
        p.error("give --data (one source) or --data-config (a mix file), not both")
    check_common_args(p, args, demo_data=(DEMO_CODES, RUN_CODES))
    try:
        args.task_mix = {k.strip(): float(v) for k, v in (kv.split("=") for kv in args.task_mix.split(","))}
        args.scales = [int(s) for s in args.scales.split(",")]
    except ValueError:
        p.error("--task-mix is name=weight,... and --scales is comma-separated integers")
    return args


def config_from_args(args):
    from tarflow.train.cli import common_kwargs
    from tarflow.train.mllm import MLLMTrainConfig

    return MLLMTrainConfig(
        **common_kwargs(args), data_config=args.data_config, base=args.base, resume_from=args.resume_from,
        tatok=args.tatok, num_image_tokens=args.num_image_tokens, task_mix=args.task_mix, scales=args.scales,
        max_length=args.max_length, rows_per_step=args.rows_per_step)


def main(argv=None) -> int:
    args = parse_args(argv)
    from tarflow.train.cli import run_trainer
    from tarflow.train.mllm import preflight, run_train_mllm

    if not (args.base or args.resume_from or args.tatok):  # no model arguments: the demo family
        import logging

        from tarflow.models.demo import demo_warning, ensure_demo_base, ensure_random_tatok
        from tarflow.models.tatok import TATok

        args.base, args.tatok = str(ensure_demo_base()), str(ensure_random_tatok())
        args.num_image_tokens = TATok.from_checkpoint(args.tatok).codebook_size
        logging.getLogger("tarflow.train").warning("%s", demo_warning("--base/--resume-from/--tatok", args.base))
    elif not (args.base or args.resume_from):
        print("error: --base/--resume-from: neither given; give --base (a Qwen2 folder) or --resume-from (a Tar "
              "checkpoint), or none of --base/--resume-from/--tatok for the demo models", file=sys.stderr)
        return 2
    return run_trainer(preflight, run_train_mllm, config_from_args(args), args, "Tar MLLM")


if __name__ == "__main__":
    sys.exit(main())
