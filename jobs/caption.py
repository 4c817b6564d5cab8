"""Caption (recaption) images from their TA-Tok code shards with the Tar MLLM.

    ray job submit --working-dir . -- python jobs/caption.py \
        --input s3://bucket/laion-tatok/ --output s3://bucket/laion-captions/ --model s3://models/Tar-1.5B

Reads the tokenize job's output (only finished shards; code shards of either kind), writes
captions/{shard}.parquet (key, prompt, caption, model, sampling, token counts, then every input column),
errors/ and _manifest/ per shard. Images are never decoded again. Conversation code shards (any number of
images per row) are answered per row: the row's `question` column, else its `conversations` whose last turn is
the human's (the answer is appended as the gpt turn); --question is for rows with neither.
"""
from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    from tarflow.pipelines.caption import DEFAULT_QUESTION
    from tarflow.pipelines.runtime import add_actor_pool_args

    p = argparse.ArgumentParser(prog="caption.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", default=None,
                   help="the tokenize job's output folder, a folder of code shards, or code shard files "
                        "[default: out/tokenize-sample, what `make run` writes]")
    p.add_argument("--output", default="out/caption-sample",
                   help="output folder or s3:// prefix [%(default)s]; under `ray job submit` an absolute path or s3://")
    p.add_argument("--model", default=None,
                   help="Tar checkpoint folder (Qwen2 + tokenizer), local or s3://. Default: a small RANDOM-weight "
                        "demo Tar created on first use (its captions are noise; `make demo` trains one)")
    p.add_argument("--scale", type=int, default=1, help="which stored pool scale to read (tatok_s{scale}) [1]")
    p.add_argument("--question", default=DEFAULT_QUESTION, help="the instruction asked about each image, for rows without their own question or "
                        "conversation [%(default)s]")
    p.add_argument("--max-new-tokens", type=int, default=256, help="caption length limit in tokens [256]")
    g = p.add_argument_group("sampling (default: greedy, deterministic)")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0, help="with --sample: per-sample seeds derive from it and the key")
    add_actor_pool_args(p, "MLLM actors", "images per decoding batch (64 GPU / 8 CPU)")
    p.add_argument("--overwrite", action="store_true", help="redo shards captioned with other settings")
    p.add_argument("--max-shards", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--summary-json", default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import logging

    from tarflow.models.demo import demo_warning, ensure_demo_tar
    from tarflow.pipelines import checks
    from tarflow.pipelines.caption import CaptionConfig, run_caption
    from tarflow.pipelines.runtime import absolute_output, init_ray, run_job, setup_logging

    setup_logging()
    log = logging.getLogger("tarflow.caption")
    if args.input is None:
        args.input = ["out/tokenize-sample"]
        log.info("no --input: using %s (what `make run` writes)", args.input[0])
    if args.model is None:
        args.model = str(ensure_demo_tar())
        log.warning("%s", demo_warning("--model", args.model))
    cfg = CaptionConfig(
        input=args.input, output=args.output, model=args.model, scale=args.scale, question=args.question,
        max_new_tokens=args.max_new_tokens, greedy=not args.sample, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, overwrite=args.overwrite, batch_size=args.batch_size,
        num_workers=args.num_workers, min_workers=args.min_workers, max_writers=args.max_writers,
        gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker, dtype=args.dtype,
        compile=args.compile, max_shards=args.max_shards, stall_timeout_s=args.stall_timeout)

    found: dict = {}

    def check():
        checks.caption_problems(cfg, found).raise_if_any()
        cfg.output = absolute_output(cfg.output)

    return run_job(lambda c: run_caption(c, shards=found["inputs"]), cfg, args.summary_json, check=check,
                   start=lambda: init_ray(args.address, progress_bars=not args.no_progress), job="caption")


if __name__ == "__main__":
    sys.exit(main())
