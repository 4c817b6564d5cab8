"""Train (or fine-tune) Tar's diffusion de-tokenizer on Ray Train: TA-Tok codes -> SANA -> DC-AE latents.

Make the training data with the tokenize job and --latents (the VAE latents at the de-tokenizer's resolution):

    python jobs/tokenize_laion.py --input s3://bucket/laion/ --output s3://bucket/laion-tatok/ \\
        --tatok s3://models/ta_tok.pth --scales 1,2,3 --latents s3://models/Tar-SANA-600M-512px --latent-resolution 512

then fine-tune Tar's SANA (or train a new transformer: --transformer-config sana-600m --vae FOLDER):

    ray job submit --working-dir . -- python jobs/train_diffusion_detok.py \\
        --data s3://bucket/laion-tatok/ --tatok s3://models/ta_tok.pth --scales 1,2,3 \\
        --init s3://models/Tar-SANA-600M-512px --num-workers 8 --use-gpu --batch-size 32 --steps 20000 \\
        --storage-path s3://bucket/train --name sana-detok-ft --output s3://bucket/models/Tar-SANA-ft

The condition is the frozen TA-Tok decoder's rec features of the stored codes (SANA's encoder_hidden_states);
the target the stored latents x scaling_factor; SANA's flow-matching objective (logit-normal timesteps on the
shifted flow schedule, velocity MSE) with condition dropout (dropped rows get negative_prompt_embeds.pth, the
condition CFG samples with). bf16 autocast on GPU; --strategy fsdp shards the transformer. Checkpoints are
complete diffusers SANA pipeline folders (+ optimiser state) in --storage-path/--name every --checkpoint-every
steps; rerunning the same command resumes from the latest one. At the end the pipeline folder is copied to
--output: tarflow's generate job (--detok diffusion --diffusion-detok FOLDER) and diffusers' SanaPipeline load it.
"""
from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    from tarflow.data.sample import DEMO_CODES
    from tarflow.train.cli import add_common_args, check_common_args
    from tarflow.train.diffusion_detok import DiffusionTrainConfig

    p = argparse.ArgumentParser(prog="train_diffusion_detok.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, DiffusionTrainConfig, data_help="tokenize job outputs made with --latents (their finished "
                                                       "shards), folders of code shards, or shard files; local "
                                                       "or s3://. Default: what `make demo` writes "
                                                       "(out/demo/codes, with latents when diffusers is installed)")
    d = p.add_argument_group("condition and target")
    d.add_argument("--tatok", default=None,
                   help="the TA-Tok checkpoint that made the codes (its decoder, frozen, makes the condition); "
                        "none, with no --init/--transformer-config: the RANDOM demo TA-Tok and SANA")
    d.add_argument("--scales", default="1",
                   help="condition each row on the tatok_s{scale} codes of one of these pool scales, drawn at random "
                        "(1 -> 729, 2 -> 169, 3 -> 81 tokens), comma-separated [%(default)s]")
    d.add_argument("--latents-column", default=None, help="the latents column (default: the shards' own)")
    d.add_argument("--batch-size", type=int, default=32, help="rows per worker per micro-batch [%(default)s]")
    m = p.add_argument_group("model (--init, or --transformer-config with --vae; none of them and no --tatok: the "
                             "RANDOM demo models)")
    m.add_argument("--init", default=None,
                   help="a diffusers SANA pipeline folder to fine-tune (local or s3://; its text encoder is never "
                        "read): its transformer, vae/ (which must be the one that made the latents), scheduler "
                        "and negative_prompt_embeds.pth")
    m.add_argument("--transformer-config", default=None,
                   help="a new transformer: a SanaTransformer2DModel config.json, or 'sana-600m'; in/out "
                        "channels, sample_size and caption_channels come from the data")
    m.add_argument("--vae", default=None,
                   help="with --transformer-config: the AutoencoderDC folder (or SANA pipeline folder) that made "
                        "the latents; copied into the output")
    m.add_argument("--flow-shift", type=float, default=None,
                   help="shift of the flow schedule (default: --init's scheduler flow_shift, else 3.0 as SANA)")
    m.add_argument("--logit-mean", type=float, default=0.0, help="logit-normal timestep mean [%(default)s]")
    m.add_argument("--logit-std", type=float, default=1.0, help="logit-normal timestep std [%(default)s]")
    m.add_argument("--cond-dropout", type=float, default=0.1,
                   help="probability that a row trains with the null condition, which CFG needs [%(default)s]")
    m.add_argument("--output", default=None, help="write the final pipeline folder here (local or s3://)")
    args = p.parse_args(argv)
    check_common_args(p, args, demo_data=(DEMO_CODES,))
    try:
        args.scales = [int(v) for v in args.scales.split(",") if v.strip()]
    except ValueError:
        args.scales = []
    if not args.scales or min(args.scales) < 1:
        p.error("--scales takes comma-separated pool scales >= 1, e.g. 1,2,3")
    args.demo = not (args.tatok or args.init or args.transformer_config or args.vae)
    if args.demo:
        return args
    if not args.tatok:
        p.error("--tatok: give the TA-Tok that made the codes (or no model argument at all, for the RANDOM demo "
                "models)")
    if bool(args.init) == bool(args.transformer_config):
        p.error("give --init PIPELINE_FOLDER to fine-tune, or --transformer-config (with --vae) for a new model")
    if args.transformer_config and not args.vae:
        p.error("--transformer-config needs --vae: the VAE that made the latents")
    if args.init and args.vae:
        p.error("--init brings its own vae/: drop --vae")
    return args


def config_from_args(args):
    from tarflow.train.cli import common_kwargs
    from tarflow.train.diffusion_detok import DiffusionTrainConfig

    return DiffusionTrainConfig(
        **common_kwargs(args), tatok=args.tatok, scales=args.scales, latents_column=args.latents_column,
        init=args.init, transformer_config=args.transformer_config, vae=args.vae, flow_shift=args.flow_shift,
        logit_mean=args.logit_mean, logit_std=args.logit_std, cond_dropout=args.cond_dropout, output=args.output,
        batch_size=args.batch_size)


def main(argv=None) -> int:
    args = parse_args(argv)
    from tarflow.train.cli import run_trainer
    from tarflow.train.diffusion_detok import preflight, run_train

    if args.demo:  # no model arguments: the demo TA-Tok and SANA (what `make demo` tokenized the latents with)
        import logging

        from tarflow.models.demo import demo_warning, ensure_demo_sana, ensure_random_tatok

        args.tatok, args.init = str(ensure_random_tatok()), str(ensure_demo_sana())
        logging.getLogger("tarflow.train").warning("%s", demo_warning("--tatok/--init", args.init))
    return run_trainer(preflight, run_train, config_from_args(args), args, "diffusion de-tokenizer")


if __name__ == "__main__":
    sys.exit(main())
