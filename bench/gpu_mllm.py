"""GPU benchmark of the Tar MLLM's batched decoder against Hugging Face `generate` (issue: >= 20,000 T2I
tokens/s and >= 50 captions/s per H200 at the Tar-1.5B shape).

    python bench/gpu_mllm.py           # H200: Qwen2.5-1.5B shape, vocab 217206, random weights, bf16
    python bench/gpu_mllm.py --tiny    # any machine: a tiny Qwen2 with the full vocabulary, on CPU

Measures, in one run and on the same model:
  T2I      prompts of ~27 tokens, then 729 image tokens (sampling: top-k 1200, top-p 0.95; tarflow restricts
           logits to the image range as the reference keeps only image tokens)
  caption  prompts of 729 image tokens + ~25 text tokens, then up to 256 tokens
for Hugging Face `generate` (baseline; fewer new tokens where it would take minutes, reported per token) and
tarflow's BatchedDecoder (eager, and with the forward compiled on GPU). Prints tokens/s, images/s, captions/s;
writes JSON to --json or $OUT/gpu_mllm.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]  # bench/tokenize.py shadows stdlib
sys.path.insert(0, os.path.dirname(_HERE))

from bench.common import write_results  # noqa: E402

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


def prompts(kind: str, batch: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    if kind == "t2i":  # chat text, then <im_start><S0>
        return [[rng.randrange(1000, 100000) for _ in range(20 + rng.randrange(10))] + [151665, 151667]
                for _ in range(batch)]
    return [[IMAGE_BASE + rng.randrange(N_IMAGE) for _ in range(729)]
            + [rng.randrange(1000, 100000) for _ in range(25)] for _ in range(batch)]


def time_it(fn, device) -> float:
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.time()
    fn()
    sync()
    return time.time() - t0


def hf_generate(model, ps, n_new, device, **kw):
    import torch

    P = max(map(len, ps))
    ids = torch.tensor([[PAD] * (P - len(p)) + p for p in ps], device=device)
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in ps], device=device)
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                          do_sample=True, top_k=1200, top_p=0.95, pad_token_id=PAD, **kw)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batch", type=int, default=None, help="rows per batch (256 GPU / 8 tiny)")
    p.add_argument("--baseline-batch", type=int, default=64)
    p.add_argument("--baseline-tokens", type=int, default=None, help="new tokens for the HF baseline (64 GPU)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    import torch

    from tarflow.models.generation import BatchedDecoder, Sampling

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build(args.tiny, device, dtype)
    B = args.batch or (8 if args.tiny else 256)
    bb = min(args.baseline_batch, B)
    n_t2i, n_cap = (64, 32) if args.tiny else (729, 256)
    n_base = args.baseline_tokens or (16 if args.tiny else 64)
    res = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": str(dtype), "batch": B,
           "baseline_batch": bb, "tiny": args.tiny, "date": time.strftime("%Y-%m-%d")}
    t2i_sampling = Sampling(temperature=1.0, top_k=1200, top_p=0.95)

    # baseline: Hugging Face generate, dynamic cache (and static cache on GPU)
    for cache in (["dynamic", "static"] if device == "cuda" else ["dynamic"]):
        kw = {} if cache == "dynamic" else {"cache_implementation": "static"}
        hf_generate(model, prompts("t2i", bb), 2, device, **kw)  # warm-up
        s = time_it(lambda: hf_generate(model, prompts("t2i", bb), n_base, device, **kw), device)
        res[f"hf_{cache}_t2i_tokens_per_s"] = bb * n_base / s
        print(f"HF generate ({cache} cache), batch {bb}: {bb * n_base / s:10.1f} tokens/s "
              f"({bb * n_base / s / 729:.2f} T2I images/s)", flush=True)
        s = time_it(lambda: hf_generate(model, prompts("caption", bb), n_base, device, **kw), device)
        res[f"hf_{cache}_caption_tokens_per_s"] = bb * n_base / s
        print(f"HF generate ({cache} cache), batch {bb}: {bb * n_base / s:10.1f} caption tokens/s "
              f"({bb * n_base / s / n_cap:.2f} captions/s of {n_cap} tokens)", flush=True)

    variants = {"tarflow eager": BatchedDecoder(model, PAD)}
    if device == "cuda" and not args.no_compile:
        variants["tarflow compiled"] = BatchedDecoder(model, PAD, compile=True)
    for name, dec in variants.items():
        tag = name.replace(" ", "_")
        try:
            dec.generate(prompts("t2i", B), 4, t2i_sampling, seeds=list(range(B)),
                         allowed_range=(IMAGE_BASE, IMAGE_BASE + N_IMAGE))  # warm-up / compile
            s = time_it(lambda: dec.generate(prompts("t2i", B), n_t2i, t2i_sampling, seeds=list(range(B)),
                                             allowed_range=(IMAGE_BASE, IMAGE_BASE + N_IMAGE)), device)
            res[f"{tag}_t2i_tokens_per_s"] = B * n_t2i / s
            res[f"{tag}_t2i_images_per_s"] = B / s if not args.tiny else B * n_t2i / s / 729
            print(f"{name}, batch {B}: {B * n_t2i / s:10.1f} T2I tokens/s "
                  f"({B * n_t2i / s / 729:.2f} images/s of 729 tokens)", flush=True)
            s = time_it(lambda: dec.generate(prompts("caption", B), n_cap, Sampling(greedy=True),
                                             stop_ids=(EOS,)), device)
            res[f"{tag}_captions_per_s"] = B / s
            res[f"{tag}_caption_tokens_per_s"] = B * n_cap / s
            print(f"{name}, batch {B}: {B / s:8.2f} captions/s of {n_cap} tokens "
                  f"({B * n_cap / s:.1f} tokens/s)", flush=True)
        except Exception as e:  # a compile failure must not hide the other figures
            res[f"{tag}_error"] = f"{type(e).__name__}: {e}"[:500]
            print(f"{name}: failed: {res[f'{tag}_error']}")
    base = res.get("hf_dynamic_t2i_tokens_per_s")
    best = max((v for k, v in res.items() if k.endswith("_t2i_tokens_per_s") and k.startswith("tarflow")),
               default=None)
    if base and best:
        res["speedup_t2i_tokens"] = best / base
        print(f"T2I tokens/s, tarflow / HF generate: {best / base:.1f}x")
    bench_reflect(model, device, res, 8 if args.tiny else 64)
    write_results(res, args.json, "gpu_mllm.json")


def bench_reflect(model, device, res: dict, batch: int) -> None:
    """Self-reflection's scoring pass (tarflow/models/reflect.py): one forward per batch of candidates of 729
    image tokens + ~45 text tokens (the default question with a prompt), P(yes) at the last position."""
    from types import SimpleNamespace

    from tarflow.models.reflect import ReflectScorer

    # token ids only (no tokenizer here): "Yes"/"yes"/" Yes"/" yes"/"YES" and the no's in Qwen2.5's vocabulary
    answers = ((9454, 9693, 7414, 9834, 14004), (2753, 2152, 2308, 902, 8996))
    scorer = ReflectScorer(model, None, SimpleNamespace(pad_id=PAD), answer_ids=answers)
    ps = [p + [p[-1]] * 20 for p in prompts("caption", batch, seed=1)]
    try:
        scorer.score_ids(ps)  # warm-up
        s = time_it(lambda: [scorer.score_ids(ps) for _ in range(3)], device) / 3
        res["reflect_candidates_per_s"] = batch / s
        res["reflect_tokens_per_s"] = sum(map(len, ps)) / s
        print(f"reflect scoring, batch {batch}: {batch / s:8.1f} candidates/s ({sum(map(len, ps)) / s:.0f} "
              f"tokens/s)", flush=True)
    except Exception as e:  # must not hide the decoder's figures
        res["reflect_error"] = f"{type(e).__name__}: {e}"[:500]
        print(f"reflect scoring: failed: {res['reflect_error']}")


if __name__ == "__main__":
    main()
