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
import sys


def parse_args(argv=None) -> argparse.Namespace:
    from tarflow.data.sample import DEMO_CODES
    from tarflow.models.ar_detok import PRESETS
    from tarflow.train.ar_detok import ARTrainConfig
    from tarflow.train.cli import add_common_args, check_common_args

    p = argparse.ArgumentParser(prog="train_ar_detok.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, ARTrainConfig, data_help="tokenize job outputs made with --vq (their finished shards), "
                                                "folders of code shards, or code shard files; local or s3://. "
                                                "Default: what `make demo` writes (out/demo/codes)")
    d = p.add_argument_group("condition and target")
    d.add_argument("--tatok", default=None,
                   help="the TA-Tok checkpoint that made the codes (its decoder, frozen, makes the condition); "
                        "none: the RANDOM demo TA-Tok, and the demo AR de-tokenizer unless --init/--preset/sizes")
    d.add_argument("--scale", type=int, default=1,
                   help="condition on the tatok_s{scale} codes (1 -> 729, 2 -> 169, 3 -> 81 tokens) [%(default)s]")
    d.add_argument("--vq-column", default=None, help="the VQ codes column (default: the shards' own, e.g. vq16_256)")
    d.add_argument("--batch-size", type=int, default=32, help="rows per worker per micro-batch [%(default)s]")
    m = p.add_argument_group("model (one of --init, --preset, or --n-layer/--n-head/--dim; none of them and no "
                             "--tatok: the RANDOM demo models)")
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
    m.add_argument("--output", default=None, help="write the final model here (.pth, local or s3://)")
    args = p.parse_args(argv)
    check_common_args(p, args, demo_data=(DEMO_CODES,))
    sizes = (args.n_layer, args.n_head, args.dim)
    if args.init and (args.preset or any(v is not None for v in sizes)):
        p.error("--init fine-tunes a checkpoint as it is: drop --preset/--n-layer/--n-head/--dim")
    if not args.init and not args.preset and any(v is not None for v in sizes) and None in sizes:
        p.error("a new model by size needs all of --n-layer/--n-head/--dim (or --preset NAME)")
    if args.tatok and not args.init and not args.preset and None in sizes:
        p.error("give --init CHECKPOINT, --preset NAME, or all of --n-layer/--n-head/--dim (or none of them and "
                "no --tatok, for the RANDOM demo models)")
    return args


def config_from_args(args):
    from tarflow.train.ar_detok import ARTrainConfig
    from tarflow.train.cli import common_kwargs

    return ARTrainConfig(
        **common_kwargs(args), tatok=args.tatok, scale=args.scale, vq_column=args.vq_column, init=args.init,
        preset=args.preset, n_layer=args.n_layer, n_head=args.n_head, dim=args.dim, output=args.output,
        batch_size=args.batch_size, cond_dropout=args.cond_dropout)


def main(argv=None) -> int:
    args = parse_args(argv)
    from tarflow.train.ar_detok import preflight, run_train
    from tarflow.train.cli import run_trainer

    if args.tatok is None:  # no model arguments: the demo TA-Tok and AR de-tokenizer
        import logging

        from tarflow.models.demo import demo_warning, ensure_demo_ar_detok, ensure_random_tatok

        args.tatok = str(ensure_random_tatok())
        if not (args.init or args.preset or args.n_layer):
            args.init = str(ensure_demo_ar_detok())
        logging.getLogger("tarflow.train").warning("%s", demo_warning("--tatok/--init", args.init or args.tatok))
    return run_trainer(preflight, run_train, config_from_args(args), args, "AR de-tokenizer")


if __name__ == "__main__":
    sys.exit(main())
