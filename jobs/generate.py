"""Generate images in bulk from a prompt table with the Tar MLLM and a de-tokenizer.

    ray job submit --working-dir . -- python jobs/generate.py \
        --prompts s3://bucket/prompts.parquet --output s3://bucket/synthetic/ \
        --mllm s3://models/Tar-1.5B --tatok s3://models/ta_tok.pth \
        --ar-detok s3://models/ar_dtok_lp_256px.pth --vq s3://models/vq_ds16_t2i.pt

The prompt table (Parquet, CSV or JSONL) has columns id, prompt and optionally scale, seed, n, and image or
images: input images (paths, s3:// URLs, bytes, or keys of rows of the --codes code shards) for edits and
variations, where the model sees the images' codes and the prompt as the instruction. Output:
img2dataset-style WebDataset shards ({shard}.tar with {key}.png, {key}.txt (prompt), {key}.json (seed,
sampling, model ids, codes), {shard}.parquet, {shard}_stats.json), errors/ and _manifest/. Deterministic per
seed; rerunning skips finished shards. With --reflect --candidates N --keep K the MLLM scores N candidates per
image from their codes and only the K best are de-tokenized (README: Self-reflection).
"""
from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    from tarflow.pipelines.runtime import add_actor_pool_args

    p = argparse.ArgumentParser(prog="generate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", default=None,
                   help="prompt table: .parquet, .csv or .jsonl (local or s3://) [default: the sample's captions]")
    p.add_argument("--output", default="out/generate-sample",
                   help="output folder or s3:// prefix [%(default)s]; under `ray job submit` an absolute path or s3://")
    p.add_argument("--mllm", default=None,
                   help="Tar checkpoint folder (Qwen2 + tokenizer). Default, with no model argument at all: the "
                        "RANDOM-weight demo family (Tar, TA-Tok, AR de-tokenizer and VQ, or with --detok diffusion "
                        "the demo SANA), whose images are noise")
    p.add_argument("--tatok", default=None, help="TA-Tok checkpoint (its decoder conditions the de-tokenizer)")
    p.add_argument("--detok", choices=["ar", "diffusion"], default="ar", help="de-tokenizer [ar]")
    p.add_argument("--ar-detok", default=None, help="AR de-tokenizer checkpoint (ar_dtok_*.pth)")
    p.add_argument("--vq", default=None, help="pixel VQ checkpoint (vq_ds16_t2i.pt)")
    p.add_argument("--diffusion-detok", default=None, help="SANA de-tokenizer folder (diffusers format)")
    p.add_argument("--codes", nargs="+", default=None,
                   help="code shards (the tokenize job's output, either kind) whose rows the table's images may "
                        "name by key (KEY, SHARD/KEY, KEY#k): such images are never decoded again. With --codes, "
                        "image paths must be absolute or URLs")
    p.add_argument("--scale", type=int, default=1, help="pool scale for rows without one (1: 729 tokens) [1]")
    p.add_argument("--seed", type=int, default=0, help="seed for rows without one: seed + row number [0]")
    p.add_argument("--n", type=int, default=1, help="images per prompt for rows without n [1]")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--image-format", choices=["png", "jpg"], default="png")
    g = p.add_argument_group("sampling (defaults: the reference's T2I settings)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=1200)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--cfg-scale", type=float, default=4.0, help="AR de-tokenizer classifier-free guidance")
    g.add_argument("--guidance-scale", type=float, default=4.0, help="diffusion de-tokenizer guidance")
    g.add_argument("--steps", type=int, default=20, help="diffusion de-tokenizer steps")
    add_reflect_args(p)
    add_actor_pool_args(p, "generator actors", "images per batch (32 GPU / 4 CPU)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--summary-json", default=None)
    args = p.parse_args(argv)
    models = (args.mllm, args.tatok, args.ar_detok, args.vq, args.diffusion_detok)
    args.demo = all(m is None for m in models)
    if args.demo:
        return args
    if not (args.mllm and args.tatok):
        p.error("give --mllm and --tatok (or no model argument at all, for the RANDOM demo models)")
    if args.detok == "ar" and not (args.ar_detok and args.vq):
        p.error("--detok ar needs --ar-detok and --vq")
    if args.detok == "diffusion" and not args.diffusion_detok:
        p.error("--detok diffusion needs --diffusion-detok")
    return args


# tarflow.models.reflect.DEFAULT_QUESTION, spelled out so that --help needs no torch (tests/test_reflect.py checks)
DEFAULT_QUESTION = 'Does this image match the description "{prompt}"? Answer yes or no.'


def add_reflect_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("self-reflection (best-of-N): Tar scores its own candidates from their codes")
    g.add_argument("--reflect", action="store_true",
                   help="score each image with the MLLM (P(yes) / (P(yes) + P(no)) to the question below)")
    g.add_argument("--candidates", type=int, default=1, help="code sequences sampled per image request (N) [1]")
    g.add_argument("--keep", type=int, default=1, help="best candidates kept (and de-tokenized) per request (K) [1]")
    g.add_argument("--reflect-question", default=None,
                   help=f"question after the image tokens, {{prompt}} = the prompt [{DEFAULT_QUESTION!r}]")
    g.add_argument("--keep-all-scores", action="store_true",
                   help="also write reflect/{shard}.parquet: every candidate's seed, codes, score, kept")


def reflect_kwargs(args: argparse.Namespace) -> dict:
    return {"reflect": args.reflect, "candidates": args.candidates, "keep": args.keep,
            "reflect_question": args.reflect_question, "keep_all_scores": args.keep_all_scores}


def main(argv=None) -> int:
    args = parse_args(argv)
    import logging

    from tarflow.data import sample
    from tarflow.models import demo
    from tarflow.pipelines import checks
    from tarflow.pipelines.generate import GenerateConfig, PromptTableError, run_generate
    from tarflow.pipelines.runtime import absolute_output, init_ray, run_job, setup_logging

    setup_logging()
    log = logging.getLogger("tarflow.generate")
    if args.demo:
        args.mllm, args.tatok = str(demo.ensure_demo_tar()), str(demo.ensure_random_tatok())
        if args.detok == "diffusion":
            args.diffusion_detok = str(demo.ensure_demo_sana())
        else:
            args.ar_detok, args.vq = str(demo.ensure_demo_ar_detok()), str(demo.ensure_demo_vq())
        log.warning("%s", demo.demo_warning("model arguments", demo.demo_model_folder("*")))
    if args.prompts is None:
        args.prompts = str(sample.ensure_demo_prompts())
        log.info("no --prompts: using the sample's captions %s", args.prompts)
    cfg = GenerateConfig(
        prompts=args.prompts, output=args.output, mllm=args.mllm, tatok=args.tatok, detok=args.detok,
        ar_detok=args.ar_detok, vq=args.vq, diffusion_detok=args.diffusion_detok, scale=args.scale, seed=args.seed,
        n=args.n, codes=args.codes, samples_per_shard=args.samples_per_shard, image_format=args.image_format,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, cfg_scale=args.cfg_scale,
        guidance_scale=args.guidance_scale, num_inference_steps=args.steps, overwrite=args.overwrite,
        batch_size=args.batch_size, num_workers=args.num_workers, min_workers=args.min_workers,
        max_writers=args.max_writers, gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
        dtype=args.dtype, compile=args.compile, stall_timeout_s=args.stall_timeout, **reflect_kwargs(args))

    def check():
        problems = checks.generate_problems(cfg)
        cfg.reflect_problems(problems)
        if not problems:  # the table and the code shards only once the paths are known to be there
            cfg.input_problems(problems)
        problems.raise_if_any()
        cfg.output = absolute_output(cfg.output)

    return run_job(run_generate, cfg, args.summary_json, (PromptTableError,), check=check,
                   start=lambda: init_ray(args.address, progress_bars=not args.no_progress))


if __name__ == "__main__":
    sys.exit(main())
