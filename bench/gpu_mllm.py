"""GPU benchmark of the Tar MLLM's batched decoder against Hugging Face `generate` (issue: >= 20,000 T2I
tokens/s and >= 50 captions/s per H200 at the Tar-1.5B shape).

    python bench/gpu_mllm.py           # H200: Qwen2.5-1.5B shape, vocab 217206, random weights, bf16
    python bench/gpu_mllm.py --tiny    # any machine: a tiny Qwen2 with the full vocabulary, on CPU

Measures, in one run and on the same model:
  T2I      prompts of ~27 tokens, then 729 image tokens (sampling: top-k 1200, top-p 0.95; tarflow restricts
           logits to the image range as the reference keeps only image tokens)
  caption  prompts of 729 image tokens + ~25 text tokens, then up to 256 tokens
for Hugging Face `generate` at the same batch (baseline; 64 new tokens, reported per token: its full lengths
would take minutes) and tarflow's BatchedDecoder (eager, and with the forward compiled: CUDA graphs on GPU,
Dynamo's capture only on CPU). Prints tokens/s, images/s, captions/s; writes JSON to --json or
$OUT/gpu_mllm.json. bench/gpu_check.py runs the same measurement. Then self-reflection's scoring pass
(candidates/s: one forward over 729 image tokens + ~45 of text per candidate, batch 64).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]  # bench/tokenize.py shadows stdlib
sys.path.insert(0, os.path.dirname(_HERE))

from bench.common import Budget, Results, compiler, device_name, results_path, timed  # noqa: E402

VOCAB = 217206
IMAGE_BASE, N_IMAGE = 151670, 65536
EOS, PAD = 151645, 151643


def build(tiny: bool, device: str, dtype):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if tiny:
        cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                          max_position_embeddings=4096)
    else:  # Qwen2.5-1.5B with Tar's vocabulary
        cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                          num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
                          max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(dtype).eval()
    return model


def prompts(kind: str, batch: int, seed: int = 0, image_tokens: int = 729) -> list[list[int]]:
    """T2I: ~27 tokens of chat text, then <im_start><S0>. Caption: `image_tokens` image tokens, then 25 of text."""
    import random

    rng = random.Random(seed)
    if kind == "t2i":
        return [[rng.randrange(1000, 100000) for _ in range(20 + rng.randrange(10))] + [151665, 151667]
                for _ in range(batch)]
    return [[IMAGE_BASE + rng.randrange(N_IMAGE) for _ in range(image_tokens)]
            + [rng.randrange(1000, 100000) for _ in range(25)] for _ in range(batch)]


def hf_generate(model, ps, n_new, sample: bool, **kw):
    """Hugging Face generate on left-padded prompts, exactly `n_new` new tokens per row."""
    import torch

    device = model.device
    P = max(map(len, ps))
    ids = torch.tensor([[PAD] * (P - len(p)) + p for p in ps], device=device)
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in ps], device=device)
    how = dict(do_sample=True, top_k=1200, top_p=0.95) if sample else dict(do_sample=False)
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                          pad_token_id=PAD, **how, **kw)


def mllm_throughput(model, batch: int, res: Results, *, n_t2i: int, n_cap: int, n_base: int,
                    caption_image_tokens: int = 729, compile: bool = True, hf_static: bool = True,
                    budget: Budget | None = None, compile_need_s: float = 0.0,
                    hf_static_need_s: float = 0.0) -> None:
    """T2I tokens/s and images/s, captions/s: Hugging Face generate (dynamic cache), tarflow's BatchedDecoder
    eager and compiled, then HF generate with its static cache (it compiles itself: last, as time allows);
    all at the same batch, on the same model, into `res`."""
    from tarflow.models.generation import BatchedDecoder, Sampling

    dev = model.device
    res.set(batch=batch, t2i_tokens_per_image=n_t2i, caption_tokens=n_cap, hf_new_tokens=n_base,
            t2i_prompt_tokens="~27 (chat text, <im_start>, <S0>)", caption_prompt_tokens=caption_image_tokens + 25)
    t2i_sampling = Sampling(temperature=1.0, top_k=1200, top_p=0.95)
    image_range = (IMAGE_BASE, IMAGE_BASE + N_IMAGE)
    t2i_prompts, cap_prompts = prompts("t2i", batch), prompts("caption", batch, image_tokens=caption_image_tokens)

    def hf(tag, **kw):
        hf_generate(model, t2i_prompts, n_base, True, **kw)  # warm-up, same shapes (a static cache compiles here)
        s = timed(lambda: hf_generate(model, t2i_prompts, n_base, True, **kw), dev)
        res.figure(**{f"{tag}_t2i_tokens_per_s": batch * n_base / s})
        print(f"HF generate ({tag}), batch {batch}: {batch * n_base / s:10.1f} T2I tokens/s "
              f"({batch * n_base / s / n_t2i:.2f} images/s of {n_t2i} tokens)", flush=True)
        s = timed(lambda: hf_generate(model, cap_prompts, n_base, False, **kw), dev)
        res.figure(**{f"{tag}_caption_tokens_per_s": batch * n_base / s,
                      f"{tag}_captions_per_s": batch * n_base / s / n_cap})
        print(f"HF generate ({tag}), batch {batch}: {batch * n_base / s:10.1f} caption tokens/s "
              f"({batch * n_base / s / n_cap:.2f} captions/s of {n_cap} tokens)", flush=True)

    def tarflow(tag, dec):
        seeds = list(range(batch))
        # Warm-up runs (compiling / capturing graphs) of the timed runs' shapes (prompts, cache length) that end
        # after 8 steps: every token they can make is a stop token.
        dec.generate(t2i_prompts, n_t2i, t2i_sampling, seeds=seeds, allowed_range=image_range,
                     stop_ids=tuple(range(*image_range)))
        dec.generate(cap_prompts, n_cap, Sampling(greedy=True), stop_ids=tuple(range(VOCAB)))
        s = timed(lambda: dec.generate(t2i_prompts, n_t2i, t2i_sampling, seeds=seeds, allowed_range=image_range),
                  dev)
        res.figure(**{f"{tag}_t2i_tokens_per_s": batch * n_t2i / s, f"{tag}_t2i_images_per_s": batch / s})
        print(f"{tag}, batch {batch}: {batch * n_t2i / s:10.1f} T2I tokens/s ({batch / s:.2f} images/s of "
              f"{n_t2i} tokens)", flush=True)
        out = []
        s = timed(lambda: out.append(dec.generate(cap_prompts, n_cap, Sampling(greedy=True), stop_ids=(EOS,))), dev)
        made = sum(len(t) + stop for t, stop in zip(out[0].tokens, out[0].stopped))  # a row may end early
        res.figure(**{f"{tag}_captions_per_s": batch / s, f"{tag}_caption_tokens_per_s": made / s})
        print(f"{tag}, batch {batch}: {batch / s:8.2f} captions/s of up to {n_cap} tokens ({made / s:.1f} "
              f"tokens/s)", flush=True)

    def compiled_decoder():
        if dev.type == "cuda":
            return BatchedDecoder(model, PAD, compile=True)  # tarflow's own compile (reduce-overhead)
        dec = BatchedDecoder(model, PAD)
        dec.forward = compiler(dev)(model.forward, dynamic=False)
        return dec

    res.attempt("hf_dynamic", lambda: hf("hf_dynamic"), budget=budget)
    res.attempt("tarflow_eager", lambda: tarflow("tarflow_eager", BatchedDecoder(model, PAD)), budget=budget)
    if compile:
        res.attempt("tarflow_compiled", lambda: tarflow("tarflow_compiled", compiled_decoder()), budget=budget,
                    need_s=compile_need_s)
    if hf_static:
        res.attempt("hf_static", lambda: hf("hf_static", cache_implementation="static"), budget=budget,
                    need_s=hf_static_need_s)
    f = res.figures
    best = max((v for k, v in f.items() if k.startswith("tarflow") and k.endswith("_t2i_tokens_per_s")),
               default=None)
    if best and f.get("hf_dynamic_t2i_tokens_per_s"):
        res.figure(speedup_t2i_tokens_over_hf=best / f["hf_dynamic_t2i_tokens_per_s"])
        print(f"T2I tokens/s, tarflow / HF generate: {best / f['hf_dynamic_t2i_tokens_per_s']:.1f}x", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batch", type=int, default=None, help="rows per batch, HF and tarflow (256 GPU / 8 tiny)")
    p.add_argument("--baseline-tokens", type=int, default=None, help="new tokens for the HF baseline (64 / 16)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    res = Results("mllm_decode", results_path(args.json, "gpu_mllm.json"), device=device_name(device),
                  dtype=str(dtype), tiny=args.tiny, date=time.strftime("%Y-%m-%d"))
    model = build(args.tiny, device, dtype)
    n_t2i, n_cap = (64, 32) if args.tiny else (729, 256)
    mllm_throughput(model, args.batch or (8 if args.tiny else 256), res, n_t2i=n_t2i, n_cap=n_cap,
                    n_base=args.baseline_tokens or (16 if args.tiny else 64), compile=not args.no_compile,
                    hf_static=device == "cuda")
    res.attempt("reflect", lambda: reflect_throughput(model, 8 if args.tiny else 64, res))


def reflect_throughput(model, batch: int, res: Results) -> None:
    """Self-reflection's scoring pass (tarflow/models/reflect.py): one forward per batch of candidates of 729
    image tokens + ~45 text tokens (the default question with a prompt), P(yes) at the last position."""
    from types import SimpleNamespace

    from tarflow.models.reflect import ReflectScorer

    # token ids only (no tokenizer here): "Yes"/"yes"/" Yes"/" yes"/"YES" and the no's in Qwen2.5's vocabulary
    answers = ((9454, 9693, 7414, 9834, 14004), (2753, 2152, 2308, 902, 8996))
    scorer = ReflectScorer(model, None, SimpleNamespace(pad_id=PAD), answer_ids=answers)
    ps = [p + [p[-1]] * 20 for p in prompts("caption", batch, seed=1)]
    scorer.score_ids(ps)  # warm-up
    s = timed(lambda: [scorer.score_ids(ps) for _ in range(3)], model.device) / 3
    tokens = sum(map(len, ps))
    res.figure(reflect_batch=batch, reflect_candidates_per_s=batch / s, reflect_tokens_per_s=tokens / s)
    print(f"reflect scoring, batch {batch}: {batch / s:8.1f} candidates/s ({tokens / s:.0f} tokens/s)", flush=True)


if __name__ == "__main__":
    main()
