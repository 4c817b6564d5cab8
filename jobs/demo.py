"""The whole chain on the bundled sample with the RANDOM demo models, in one process (`make demo`).

    python jobs/demo.py [--output out/demo]

1. tokenize the sample (demo TA-Tok, the demo pixel VQ at 128 px: AR de-tokenizer training data, and with
   diffusers installed the demo SANA's VAE latents at 64 px: diffusion de-tokenizer training data)
2. train a tiny Tar MLLM on those codes (image-to-text, scale 3) until it gives back each photo's caption
3. caption the codes with it            4. generate images from the sample's captions with it
5. train the demo AR de-tokenizer a few steps
6. (with diffusers) train the demo SANA diffusion de-tokenizer a few steps
7. train (continue) the demo TA-Tok a few steps on the sample's images
8. the sample as a miniature of Tar's conversation mix (I2T, T2I, an edit, two-image questions, text), each source
   tokenized as conversation code shards      9. train the demo Tar on that mix by its ratios (--data-config)
Each step is the job script of the same name with its own arguments, so the printed commands can be rerun one by
one. Every model is small and random (or trained for a minute on 8 images): this shows the jobs working, not
results. Real results need the released checkpoints (see the README).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import sys
import time

JOBS = os.path.dirname(os.path.abspath(__file__))
# The conversation path (Tar's own corpora: tarflow/data/demo_mix.py's miniature of the reference's mix, tokenized
# with `tokenize_laion.py --input-format conversations` and trained on with `train_mllm.py --data-config`);
# tests/test_demo.py runs the demo either way.
CONVERSATION_STEPS = True
MLLM_STEPS = 300
MIX_STEPS = 100  # the mix run shows the path (sources, ratios, per-task counts); the learning test is elsewhere
COPIES = 75  # training rows per epoch = 8 photos x 75: Ray Data restarts each epoch, which costs seconds


def job(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(JOBS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def step(title: str, name: str, argv: list[str]) -> None:
    print(f"\n=== {title}\n$ python jobs/{name}.py {shlex.join(argv)}", flush=True)
    rc = job(name).main(argv)
    if rc:
        print(f"demo: jobs/{name}.py ended with exit status {rc}; stopping", file=sys.stderr)
        sys.exit(rc)


def repeated_rows(codes_dir: str, path: str, times: int) -> None:
    """The code shards' rows `times` over under distinct keys, as one code shard (schema and footer kept)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tarflow.data.codeshard import read_code_shard

    shards = sorted(os.path.join(codes_dir, f) for f in os.listdir(codes_dir) if f.endswith(".parquet"))
    tables = [read_code_shard(s) for s in shards]
    rows = [r for t in tables for r in t.to_pylist()]
    copies = [{**r, "key": f"{r['key']}/{k}"} for k in range(times) for r in rows]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(copies, schema=tables[0].schema), path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="demo.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="out/demo", help="where every step writes [%(default)s]")
    p.add_argument("--mllm-steps", type=int, default=MLLM_STEPS, help="MLLM training steps [%(default)s]")
    args = p.parse_args(argv)
    out = os.path.abspath(args.output)
    t0 = time.time()
    from tarflow.data.sample import ensure_demo_prompts
    from tarflow.models import demo
    from tarflow.models.demo import DEMO_LATENT_RESOLUTION, DEMO_VQ_RESOLUTION

    diffusion = _has_diffusers()
    steps = Steps(5 + diffusion + 1 + (CONVERSATION_STEPS and 2))
    codes = os.path.join(out, "codes")
    latents = ["--latents", "demo", "--latent-resolution", str(DEMO_LATENT_RESOLUTION)] if diffusion else []
    steps.run("tokenize the sample (demo TA-Tok + demo VQ" + (" + demo SANA's VAE)" if diffusion else ")"),
              "tokenize_laion", ["--output", codes, "--vq", "demo", "--vq-resolution", str(DEMO_VQ_RESOLUTION),
                                 "--scales", "1,3", *latents])

    train_rows = os.path.join(out, "train-mllm-data", f"sample-x{COPIES}.parquet")
    repeated_rows(os.path.join(codes, "codes"), train_rows, COPIES)
    mllm_json = os.path.join(out, "train-mllm.json")
    steps.run("train the demo Tar MLLM (image -> caption, scale 3)", "train_mllm",
              ["--data", train_rows, "--storage-path", os.path.join(out, "runs"), "--name", "tar-demo",
               "--task-mix", "i2t=1", "--scales", "3", "--max-length", "256", "--steps", str(args.mllm_steps),
               "--lr", "2e-2", "--warmup-ratio", "0.05", "--num-workers", "2", "--cpus-per-worker", "0.5",
               "--log-every", "25", "--checkpoint-every", str(args.mllm_steps), "--summary-json", mllm_json])
    with open(mllm_json) as f:
        tar = json.load(f)["checkpoint"]

    captions = os.path.join(out, "captions")
    steps.run("caption the codes with it", "caption",
              ["--input", codes, "--model", tar, "--scale", "3", "--output", captions, "--max-new-tokens", "40"])
    own = _read_column(os.path.join(codes, "codes"), "caption")  # key -> the photo's caption in the sample
    got = _read_column(os.path.join(captions, "captions"), "caption")
    print(f"photos captioned with their own caption: {sum(got[k] == c for k, c in own.items())}/{len(own)}")

    images = os.path.join(out, "images")
    steps.run("generate images from the sample's captions (demo AR de-tokenizer and VQ: noise)", "generate",
              ["--prompts", str(ensure_demo_prompts()), "--mllm", tar, "--tatok", str(demo.ensure_random_tatok()),
               "--ar-detok", str(demo.ensure_demo_ar_detok()), "--vq", str(demo.ensure_demo_vq()), "--scale",
               "3", "--output", images])

    ar = os.path.join(out, "ar_dtok_demo.pth")
    steps.run("train the demo AR de-tokenizer a few steps", "train_ar_detok",
              ["--data", codes, "--storage-path", os.path.join(out, "runs"), "--name", "ar-demo", "--steps", "4",
               "--batch-size", "4", "--log-every", "2", "--checkpoint-every", "4", "--cpus-per-worker", "1",
               "--output", ar])

    sana = os.path.join(out, "sana_demo")
    if diffusion:
        steps.run("train the demo SANA diffusion de-tokenizer a few steps", "train_diffusion_detok",
                  ["--data", codes, "--storage-path", os.path.join(out, "runs"), "--name", "sana-demo", "--steps",
                   "4", "--batch-size", "4", "--log-every", "2", "--checkpoint-every", "4", "--cpus-per-worker",
                   "1", "--output", sana])
    else:
        print("\n(the diffusion de-tokenizer's steps are skipped: diffusers is not installed; "
              "pip install 'tarflow[diffusion]')")

    tatok = os.path.join(out, "tatok_demo", "ta_tok.pth")
    steps.run("train (continue) the demo TA-Tok a few steps on the sample's images", "train_tatok",
              ["--storage-path", os.path.join(out, "runs"), "--name", "tatok-demo", "--steps", "4",
               "--batch-size", "4", "--log-every", "2", "--checkpoint-every", "4", "--cpus-per-worker", "1",
               "--output", tatok])

    outputs = [("code shards", codes), ("trained demo Tar MLLM", tar), ("captions", captions),
               ("generated images (WebDataset shards)", images), ("trained AR de-tokenizer", ar)]
    if diffusion:
        outputs.append(("trained SANA de-tokenizer", sana))
    outputs.append(("trained TA-Tok", tatok))
    if CONVERSATION_STEPS:
        outputs += conversation_steps(steps, out, min(args.mllm_steps, MIX_STEPS))

    print(f"\ndemo done in {time.time() - t0:.0f} s (RANDOM-UNTRAINED models: the outputs show the jobs, not results)")
    for what, where in outputs:
        print(f"  {what:<38} {where}")
    return 0


def conversation_steps(steps: "Steps", out: str, mllm_steps: int) -> list[tuple[str, str]]:
    """Tar's own kind of data: the sample's photos as a miniature of the reference's mix (tarflow/data/demo_mix.py),
    each source tokenized as conversation code shards, then the MLLM trained on them by the mix's ratios."""
    from tarflow.data.demo_mix import DEMO_MIX, write_demo_mix, write_mix_config

    raw = os.path.join(out, "conversations")
    write_demo_mix(raw)
    tokenized = os.path.join(out, "conversation-codes")
    steps.count += 1  # one step, a tokenize run per source
    for group in DEMO_MIX:
        for source in group.sources:
            steps.run(f"tokenize the conversation source {source!r} ({group.name})", "tokenize_laion",
                      ["--input", os.path.join(raw, source, "data"), "--input-format", "conversations",
                       "--output", os.path.join(tokenized, source), "--scales", "1,3"], count=False)
    mix = write_mix_config(os.path.join(tokenized, "mix.yaml"),
                           [([os.path.join(tokenized, s) for s in g.sources], g.ratio, g.name) for g in DEMO_MIX])
    summary = os.path.join(out, "train-mllm-conversations.json")
    steps.run("train the demo Tar MLLM on the conversation mix", "train_mllm",
              ["--data-config", str(mix), "--storage-path", os.path.join(out, "runs"), "--name", "tar-demo-mix",
               "--scales", "3", "--max-length", "512", "--steps", str(mllm_steps), "--lr", "2e-2",
               "--warmup-ratio", "0.05", "--num-workers", "2", "--cpus-per-worker", "0.5", "--log-every", "25",
               "--checkpoint-every", str(mllm_steps), "--summary-json", summary])
    with open(summary) as f:
        return [("conversation sources and mix.yaml", raw), ("their conversation code shards", tokenized),
                ("Tar MLLM trained on the mix", json.load(f)["checkpoint"])]


class Steps:
    """Runs the steps, numbered "k/total"."""

    def __init__(self, total: int):
        self.total, self.count = total, 0

    def run(self, title: str, name: str, argv: list[str], count: bool = True) -> None:
        self.count += count
        step(f"{self.count}/{self.total} {title}", name, argv)


def _has_diffusers() -> bool:
    return importlib.util.find_spec("diffusers") is not None


def _read_column(folder: str, column: str) -> dict[str, str]:
    """key -> `column` over the Parquet files of `folder`."""
    import pyarrow.parquet as pq

    rows = [r for f in sorted(os.listdir(folder)) if f.endswith(".parquet")
            for r in pq.read_table(os.path.join(folder, f), columns=["key", column]).to_pylist()]
    return {r["key"]: r[column] for r in rows}


if __name__ == "__main__":
    sys.exit(main())
