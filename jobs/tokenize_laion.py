"""Tokenize img2dataset shards, or LLaVA-style conversation tables, into TA-Tok code Parquet shards.

    ray job submit --working-dir . -- python jobs/tokenize_laion.py \
        --input s3://bucket/laion/ --output s3://bucket/laion-tatok/ --tatok s3://models/ta_tok.pth --scales 1,2,3
    # conversation tables (Tar's own corpora): Parquet with `conversations` and `image`, e.g. a downloaded
    # Hugging Face dataset folder, or JSON/JSONL whose image paths are under --image-root
    python jobs/tokenize_laion.py --input /data/LLaVA-ReCap-558K --output /data/tok/recap558k \
        --tatok /models/ta_tok.pth

With no arguments it runs on the bundled sample with a small RANDOM-weight TA-Tok (a demo of the pipeline:
its codes are meaningless), on a private local Ray.
"""
from __future__ import annotations

import argparse
import logging
import sys

from tarflow.data.images import DEFAULT_MAX_PIXELS
from tarflow.data.img2dataset import DEFAULT_MAX_MEMBER_BYTES


def parse_args(argv=None) -> argparse.Namespace:
    from tarflow.pipelines.runtime import add_stall_timeout_arg

    p = argparse.ArgumentParser(
        prog="tokenize_laion.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("input and output")
    io.add_argument("--input", nargs="+", default=None,
                    help="img2dataset output, or conversation tables (.parquet with `conversations`, .json/.jsonl; a "
                         "Hugging Face dataset folder's data/ is looked into): folder/prefix, brace pattern "
                         "('{00000..00999}.tar'), glob, list file (.txt), or files; local or s3://. One output shard "
                         "per input file, named after it. Default: the bundled sample.")
    io.add_argument("--input-format", choices=["auto", "webdataset", "parquet", "conversations"], default="auto",
                    help="auto: tars if present, else .parquet (conversation tables when the first has a "
                         "`conversations` column, else img2dataset's parquet with image bytes), else .json/.jsonl "
                         "conversation tables; conversations: read every input as a conversation table")
    io.add_argument("--image-root", default=None,
                    help="conversation tables: the folder (local or s3://) that relative image paths are under (the "
                         "reference's --image_folder)")
    io.add_argument("--output", default="out/tokenize-sample",
                    help="output folder or s3:// prefix (codes/, errors/, _manifest/) [%(default)s]; under `ray job "
                         "submit` an absolute path or s3://, since the job runs in Ray's copy of the working dir")
    io.add_argument("--overwrite", action="store_true",
                    help="redo shards whose outputs were made with another checkpoint, scales or options")
    io.add_argument("--max-shards", type=int, default=None, help="only the first N shards (for trials)")
    m = p.add_argument_group("model")
    m.add_argument("--tatok", default=None,
                   help="TA-Tok checkpoint (reference ta_tok.pth), local or s3://. Default: a small RANDOM-weight "
                        "demo model created on first use")
    m.add_argument("--scales", default="1,2,3",
                   help="pool scales to store, comma-separated (1 -> 729, 2 -> 169, 3 -> 81 tokens) [%(default)s]")
    m.add_argument("--vq", default=None,
                   help="pixel VQ-16 checkpoint (vq_ds16_t2i.pt), local or s3://: also store each image's VQ codes "
                        "at --vq-resolution in a column vq16_{resolution} (training data for the AR de-tokenizer); "
                        "'demo': the RANDOM demo VQ (with the demo TA-Tok)")
    m.add_argument("--vq-resolution", type=int, default=256,
                   help="with --vq: the de-tokenizer's resolution; images are resized to this square (RGB, PIL "
                        "bicubic on uint8, aspect not kept, as for TA-Tok) before VQ encoding [%(default)s]")
    m.add_argument("--latents", default=None,
                   help="a diffusers AutoencoderDC folder (SANA's DC-AE), or a SANA pipeline folder whose vae/ is "
                        "used, local or s3://: also store each image's VAE latents at --latent-resolution in a "
                        "column latents_{resolution} (training data for the diffusion de-tokenizer); 'demo': the "
                        "RANDOM demo SANA's (with the demo TA-Tok; needs diffusers)")
    m.add_argument("--latent-resolution", type=int, default=512,
                   help="with --latents: images are resized to this square (as for TA-Tok) before VAE encoding; "
                        "512 -> 16x16x32 latents with SANA's DC-AE [%(default)s]")
    m.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="TA-Tok encoder dtype (auto: bfloat16 on GPU, float32 on CPU; the VQ and the VAE run in "
                        "float32)")
    m.add_argument("--device", default="auto", help="auto, cpu, cuda [%(default)s]")
    d = p.add_argument_group("decoding")
    d.add_argument("--exif-transpose", action="store_true",
                   help="rotate images upright by their EXIF orientation (default: pixels as stored, as Tar and "
                        "img2dataset do)")
    d.add_argument("--max-member-bytes", type=int, default=DEFAULT_MAX_MEMBER_BYTES,
                   help="tar members declaring more are recorded as member_too_large without being read: bounds "
                        "a reader's memory whatever a tar declares [%(default)s]")
    d.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="refuse images above this many pixels (decompression bombs) [%(default)s]")
    r = p.add_argument_group("resources")
    r.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a private local Ray)")
    r.add_argument("--num-encoders", type=int, default=None,
                   help="most encoder actors of the autoscaling pool (default: every GPU the cluster has or its "
                        "autoscaler declares, 1 without GPUs)")
    r.add_argument("--min-encoders", type=int, default=1, help="the pool never shrinks below this [%(default)s]")
    r.add_argument("--gpus-per-encoder", type=float, default=None,
                   help="GPUs per encoder (default: 1 when the cluster has or can add GPUs, or with --device cuda; "
                        "else 0). Set it (or --device cuda) on an autoscaling cluster that starts with no GPU node")
    r.add_argument("--cpus-per-encoder", type=float, default=1.0, help="CPUs each encoder actor reserves "
                   "[%(default)s]")
    r.add_argument("--max-concurrent-shards", type=int, default=8, help="shards read at once [%(default)s]")
    r.add_argument("--encoder-memory", type=int, default=None,
                   help="bytes of memory each encoder actor reserves (default: 4x the checkpoints, >= 512 MiB; 0: "
                        "none, for autoscalers whose node types declare no memory)")
    r.add_argument("--max-writers", type=int, default=8,
                   help="shards assembled and written at once, by tasks on the workers [%(default)s]")
    r.add_argument("--encode-batch-size", type=int, default=None, help="images per encoder call (256 GPU / 32 CPU)")
    r.add_argument("--decode-batch-size", type=int, default=32, help="images per decode task batch [%(default)s]")
    r.add_argument("--read-chunk", type=int, default=64, help="samples per block read from a shard [%(default)s]")
    add_stall_timeout_arg(r)
    p.add_argument("--no-progress", action="store_true", help="no Ray Data progress bars (log lines only)")
    p.add_argument("--summary-json", default=None, help="also write the final summary as JSON here")
    args = p.parse_args(argv)
    try:
        args.scales = sorted({int(s) for s in args.scales.split(",") if s.strip()})
    except ValueError:
        p.error(f"--scales must be comma-separated integers, got {args.scales!r}")
    if not args.scales or min(args.scales) < 1:
        p.error("--scales needs at least one pool scale >= 1")
    if args.latent_resolution < 1:
        p.error(f"--latent-resolution must be positive, got {args.latent_resolution}")
    if args.vq_resolution < 1:
        p.error(f"--vq-resolution must be positive, got {args.vq_resolution}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from tarflow.data.img2dataset import InputError
    from tarflow.data.sample import ensure_sample_shards
    from tarflow.models.demo import demo_warning, ensure_demo_sana, ensure_demo_vq, ensure_random_tatok
    from tarflow.pipelines import checks
    from tarflow.pipelines.runtime import absolute_output, init_ray, run_job, setup_logging
    from tarflow.pipelines.tokenize import TokenizeConfig, run_tokenize

    setup_logging()
    log = logging.getLogger("tarflow.tokenize")
    if args.input is None:
        args.input = [str(ensure_sample_shards())]
        log.info("no --input: using the bundled sample %s", args.input[0])
    if args.tatok is None:
        args.tatok = str(ensure_random_tatok())
        log.warning("%s", demo_warning("--tatok", args.tatok))
    if args.vq == "demo":
        args.vq = str(ensure_demo_vq())
        log.warning("%s", demo_warning("real --vq", args.vq))
    if args.latents == "demo":
        try:
            args.latents = str(ensure_demo_sana())
        except ImportError as e:
            print(f"error: --latents demo: {e}", file=sys.stderr)
            return 2
        log.warning("%s", demo_warning("real --latents", args.latents))
    cfg = TokenizeConfig(
        input=args.input, output=args.output, tatok=args.tatok, scales=args.scales, input_format=args.input_format,
        overwrite=args.overwrite, exif_transpose=args.exif_transpose, max_pixels=args.max_pixels,
        read_chunk=args.read_chunk, decode_batch_size=args.decode_batch_size,
        encode_batch_size=args.encode_batch_size, num_encoders=args.num_encoders, min_encoders=args.min_encoders,
        max_concurrent_shards=args.max_concurrent_shards, max_writers=args.max_writers,
        max_member_bytes=args.max_member_bytes, encoder_memory=args.encoder_memory,
        gpus_per_encoder=args.gpus_per_encoder, cpus_per_encoder=args.cpus_per_encoder, dtype=args.dtype,
        device=args.device, max_shards=args.max_shards, vq=args.vq, vq_resolution=args.vq_resolution,
        latents=args.latents, latent_resolution=args.latent_resolution, image_root=args.image_root,
        stall_timeout_s=args.stall_timeout)

    found: dict = {}

    def check():
        checks.tokenize_problems(cfg, found).raise_if_any()
        cfg.output = absolute_output(cfg.output)

    return run_job(lambda c: run_tokenize(c, shards=found["inputs"]), cfg, args.summary_json, (InputError,),
                   check=check, start=lambda: init_ray(args.address, progress_bars=not args.no_progress),
                   job="tokenize")


if __name__ == "__main__":
    sys.exit(main())
