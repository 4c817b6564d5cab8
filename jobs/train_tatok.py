"""Train a TA-Tok (Tar's text-aligned image tokenizer) on Ray Train, from a SigLIP teacher and an LLM's vocabulary.

A new tokenizer for your images and your LLM (img2dataset shards of the domain, the SigLIP to distil, the Qwen2
whose input embeddings become the codebook):

    ray job submit --working-dir . -- python jobs/train_tatok.py \\
        --data s3://bucket/my-domain-shards/ --teacher /models/siglip2-so400m-patch14-384 \\
        --llm /models/Qwen2.5-1.5B-Instruct --codebook-size 65536 --codebook-rows first \\
        --num-workers 8 --use-gpu --batch-size 32 --steps 50000 \\
        --storage-path s3://bucket/train --name tatok-mydomain --output s3://bucket/models/tatok/ta_tok.pth

or continue an existing TA-Tok on new images (its encoder, frozen, is the teacher; its codebook is kept):

    python jobs/train_tatok.py --data shards/ --init ta_tok.pth --steps 5000 --output out/ta_tok.pth

Images stream through the tokenize job's own reader and decoder stages (CPU tasks) into the workers. The
student (starting as the teacher) learns to reconstruct the teacher's features at the pooled grid of a pool
scale drawn per micro-batch (--pool-scales) through the codebook and the decoder; loss = reconstruction
distance (--rec-distance) + 0.25 x commitment + 1.0 x codebook, straight-through. The codebook's `embedding`
is K rows of the LLM's input embeddings, frozen; `embedding_proj` (SimVQ) is learned. Checkpoints
(reference-format ta_tok.pth + its teacher config folder + optimiser state) go to --storage-path/--name every
--checkpoint-every steps; rerunning the same command resumes. The final ta_tok.pth (loadable by
TATok.from_checkpoint, the tokenize job and the reference) goes to --output, with the teacher's config folder
and codebook_tokens.json (the LLM token of each code) beside it.
"""
from __future__ import annotations

import argparse
import sys


def _scales(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated whole numbers, e.g. 1,2,3") from None


def parse_args(argv=None) -> argparse.Namespace:
    from tarflow.models.tatok_train import REC_DISTANCES, ROW_SELECTIONS
    from tarflow.train.cli import add_common_args, check_common_args
    from tarflow.train.tatok import TATokTrainConfig

    p = argparse.ArgumentParser(prog="train_tatok.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, TATokTrainConfig, data_help="img2dataset output: folders, .tar shards or globs; local or "
                                                   "s3://. Default: the bundled sample")
    p.add_argument("--input-format", choices=("auto", "webdataset", "parquet"), default="auto",
                   help="img2dataset output format [%(default)s]")
    m = p.add_argument_group("model (--teacher and --llm for a new TA-Tok, or --init to continue one; none of "
                             "them: continue the RANDOM demo TA-Tok)")
    m.add_argument("--teacher", default=None,
                   help="SigLIP folder (transformers SiglipModel, e.g. google/siglip2-so400m-patch14-384): the "
                        "frozen teacher and the student's starting point; input size and patch from its config")
    m.add_argument("--init", default=None, help="a ta_tok.pth to continue training (its encoder is the teacher)")
    m.add_argument("--llm", default=None,
                   help="Qwen2 folder: the codebook is K rows of its input embeddings (D = its hidden size)")
    m.add_argument("--codebook-size", type=int, default=65536, help="K, codes in the codebook [%(default)s]")
    m.add_argument("--codebook-rows", choices=ROW_SELECTIONS, default="first",
                   help="which K tokens' rows: first = the first K ids that are not special/added tokens; "
                        "frequent = the K most frequent tokens of --codebook-text (then `first` order) "
                        "[%(default)s]")
    m.add_argument("--codebook-text", default=None, help="text file for --codebook-rows frequent")
    m.add_argument("--teacher-name", default=None,
                   help="the `teacher` arg stored in ta_tok.pth, and the name of the config folder written beside "
                        "it (default: the hub id for so400m-patch14-384, else the --teacher folder's name)")
    m.add_argument("--decoder-depth", type=int, default=3, help="decoder layers of a new TA-Tok [%(default)s]")
    m.add_argument("--select-layer-id", type=int, default=-2,
                   help="encoder hidden state a new TA-Tok's codes come from (-2: the second to last; --init keeps "
                        "the checkpoint's) [%(default)s]")
    t = p.add_argument_group("objective")
    t.add_argument("--pool-scales", type=_scales, default=[1, 2, 3],
                   help="pool scales, one drawn per micro-batch [1,2,3]")
    t.add_argument("--rec-distance", choices=REC_DISTANCES, default="both",
                   help="reconstruction distance: 1 - cosine, relative MSE, or their sum [%(default)s]")
    t.add_argument("--sample-codes", action="store_true",
                   help="train on codes sampled from softmax(cos / 0.03), the reference's train mode (default: "
                        "the nearest code, as tarflow tokenizes)")
    t.add_argument("--batch-size", type=int, default=32, help="images per worker per micro-batch [%(default)s]")
    t.add_argument("--usage-window", type=int, default=100,
                   help="steps over which codebook usage (codes used, perplexity, dead codes) is counted "
                        "[%(default)s]")
    t.add_argument("--restart-dead-every", type=int, default=0,
                   help="every N steps, move codes unused in the window onto recent encoder outputs (their rows "
                        "then are no longer LLM tokens); 0 = off [%(default)s]")
    t.add_argument("--output", default=None, help="write the final ta_tok.pth here (local or s3://)")
    args = p.parse_args(argv)
    if args.data is None:
        from tarflow.data.sample import ensure_sample_shards

        args.data = [str(ensure_sample_shards())]
        print(f"tarflow: no --data: using the bundled sample {args.data[0]}", file=sys.stderr)
    check_common_args(p, args)
    if args.init and (args.teacher or args.llm):
        p.error("--init continues a TA-Tok with its own teacher and codebook: drop --teacher/--llm")
    args.demo = not (args.init or args.teacher or args.llm)
    if not args.init and not args.demo and not (args.teacher and args.llm):
        p.error("give --teacher SIGLIP_FOLDER and --llm QWEN2_FOLDER for a new TA-Tok, or --init ta_tok.pth (or "
                "none of them, to continue the RANDOM demo TA-Tok)")
    return args


def config_from_args(args):
    from tarflow.train.cli import common_kwargs
    from tarflow.train.tatok import TATokTrainConfig

    return TATokTrainConfig(
        **common_kwargs(args), input_format=args.input_format, teacher=args.teacher, init=args.init, llm=args.llm,
        codebook_size=args.codebook_size, codebook_rows=args.codebook_rows, codebook_text=args.codebook_text,
        teacher_name=args.teacher_name, decoder_depth=args.decoder_depth, select_layer_id=args.select_layer_id,
        pool_scales=args.pool_scales, rec_distance=args.rec_distance, sample_codes=args.sample_codes,
        batch_size=args.batch_size, usage_window=args.usage_window, restart_dead_every=args.restart_dead_every,
        output=args.output)


def main(argv=None) -> int:
    args = parse_args(argv)
    from tarflow.train.cli import run_trainer
    from tarflow.train.tatok import preflight, run_train

    if args.demo:  # no model arguments: continue the demo TA-Tok (its encoder is the teacher)
        import logging

        from tarflow.models.demo import demo_warning, ensure_random_tatok

        args.init = str(ensure_random_tatok())
        logging.getLogger("tarflow.train").warning("%s", demo_warning("--init/--teacher/--llm", args.init))
    return run_trainer(preflight, run_train, config_from_args(args), args, "TA-Tok")


if __name__ == "__main__":
    sys.exit(main())
