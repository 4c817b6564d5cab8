"""Self-reflection: Tar scores its own codes (tarflow/models/reflect.py), and best-of-N in the generate job.

The tiny Tar here (hidden 32, 2 layers, Tar's full vocabulary, frozen random embeddings) is trained in-process
for a few seconds on the 8 bundled sample rows (their codes at scale 3 from the reference fixture TA-Tok) to
answer the default reflect question with the very quantity the scorer reads, P(yes ids) vs P(no ids): yes for
a row's caption with its own codes, no with the codes of 3 of the 7 other rows (24 of the 56 mismatched pairs;
the other 32 are never seen in training). Measured: a row's own codes score higher than another row's in 54/56
pairs (96%), and in 30/32 (94%) of the never-seen ones; the test asserts >= 85% and >= 75%.
"""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import reference_fixture

from tarflow.pipelines.sharded import OutputConflict

SCALE = 3
TRAIN_SHIFTS = (1, 2, 3)  # row i's caption is trained as "no" with the codes of rows i+1, i+2, i+3


@pytest.fixture(scope="module")
def sample():
    """(captions, codes at scale 3) of the 8 bundled photos, encoded in-process by the fixture TA-Tok."""
    from PIL import Image

    from tarflow.data.sample import sample_photos
    from tarflow.models.tatok import TATok, pixels_from_uint8

    tatok = TATok.from_checkpoint(str(reference_fixture("ta_tok") / "ta_tok.pth"))
    photos = sample_photos()
    S = tatok.input_size
    px = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB").resize((S, S), Image.BICUBIC))
                   for _, b, _ in photos])
    codes = tatok.encode_scales(pixels_from_uint8(torch.from_numpy(px)), [SCALE])[SCALE].tolist()
    assert len({tuple(c) for c in codes}) == len(codes) == 8
    return [c for _, _, c in photos], codes


@pytest.fixture(scope="module")
def trained(sample):
    """(model, tokenizer, vocab) of a tiny Tar that learned to answer the default question on the sample."""
    import tiny_tar

    from tarflow.models.mllm import TarVocab
    from tarflow.models.reflect import ReflectScorer

    captions, codes = sample
    tok = tiny_tar.tar_tokenizer()
    vocab = TarVocab.from_tokenizer(tok)
    model = tiny_tar.tiny_tar_model(seed=0, hidden=32, layers=2, heads=4, kv_heads=2)
    scorer = ReflectScorer(model, tok, vocab)
    n = len(captions)
    pairs = [(i, i, 1.0) for i in range(n)] + [(i, (i + d) % n, 0.0) for i in range(n) for d in TRAIN_SHIFTS]
    ids = [scorer.prompt_ids(captions[i], codes[j]) for i, j, _ in pairs]
    P = max(map(len, ids))
    x = torch.full((len(ids), P), vocab.pad_id)
    mask = torch.zeros((len(ids), P), dtype=torch.long)
    for k, p in enumerate(ids):
        x[k, P - len(p):], mask[k, P - len(p):] = torch.tensor(p), 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    target = torch.tensor([y for *_, y in pairs])
    weight = torch.where(target > 0, 3.0, 1.0)  # 8 positives against 24 negatives
    emb = model.get_input_embeddings().weight  # tied: also the output rows
    emb.requires_grad_(False)  # 7M frozen random rows; only the 19k transformer weights learn (fast on CPU)
    yes, no = list(scorer.yes_ids), list(scorer.no_ids)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    torch.manual_seed(0)
    model.train()
    for _ in range(60):
        h = model.model(input_ids=x, attention_mask=mask, position_ids=pos).last_hidden_state[:, -1]  # (B, C)
        # the scorer's logit: logsumexp over the yes rows minus over the no rows (the rest of the vocab cancels)
        logit = torch.logsumexp(h @ emb[yes].T, -1) - torch.logsumexp(h @ emb[no].T, -1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, target, weight=weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, tok, vocab


def test_answer_ids_come_from_the_tokenizer_and_the_question_needs_the_prompt():
    import tiny_tar

    from tarflow.models.reflect import DEFAULT_QUESTION, answer_token_ids, check_template, question_for

    tok = tiny_tar.tar_tokenizer()
    yes, no = answer_token_ids(tok)
    assert {tok.decode([i]).strip().lower() for i in yes} == {"yes"}
    assert {tok.decode([i]).strip().lower() for i in no} == {"no"}
    assert len(yes) >= 3 and not set(yes) & set(no)
    assert question_for(DEFAULT_QUESTION, "a {cat}") == ('Does this image match the description "a {cat}"? '
                                                         'Answer yes or no.')
    with pytest.raises(ValueError, match="no {prompt} field"):
        check_template("Is this good?")


def test_own_codes_score_higher_than_another_rows_codes(sample, trained):
    from tarflow.models.reflect import ReflectScorer

    captions, codes = sample
    scorer = ReflectScorer(*trained)
    n = len(captions)
    pairs = [(i, j) for i in range(n) for j in range(n)]
    got = scorer.score([captions[i] for i, _ in pairs], [codes[j] for _, j in pairs])
    s = dict(zip(pairs, got.scores))
    assert all(0.0 <= v <= 1.0 for v in got.scores)
    wins = {(i, j): s[i, i] > s[i, j] for i in range(n) for j in range(n) if j != i}
    unseen = [w for (i, j), w in wins.items() if (j - i) % n not in TRAIN_SHIFTS]
    rate, unseen_rate = np.mean(list(wins.values())), np.mean(unseen)
    print(f"own codes score higher: {sum(wins.values())}/{len(wins)} = {rate:.2f}, never-seen pairs "
          f"{sum(unseen)}/{len(unseen)} = {unseen_rate:.2f}")
    assert rate >= 0.85 and unseen_rate >= 0.75
    assert got.tokens == sum(got.lengths) and all(40 < t < 80 for t in got.lengths)


def test_scores_do_not_depend_on_the_batch(sample, trained):
    from tarflow.models.reflect import ReflectScorer

    captions, codes = sample
    scorer = ReflectScorer(*trained)
    # prompts of many lengths, so rows get different amounts of padding in each batch
    prompts = [captions[i % 8][: 10 + 7 * i] for i in range(12)]
    cands = [codes[(3 * i) % 8] for i in range(12)]
    alone = [scorer.score_ids([scorer.prompt_ids(p, c)]).item() for p, c in zip(prompts, cands)]
    for bs in (1, 5, 12):
        assert scorer.score(prompts, cands, batch_size=bs).scores == pytest.approx(alone, abs=1e-5)
    perm = np.random.default_rng(0).permutation(12)
    mixed = scorer.score_ids([scorer.prompt_ids(prompts[i], cands[i]) for i in perm]).tolist()
    assert mixed == pytest.approx([alone[i] for i in perm], abs=1e-5)
    assert max(alone) - min(alone) > 1e-3  # the rows do differ: equal scores are no accident


def test_candidate_seeds_and_ranking():
    from tarflow.models.reflect import candidate_seed, rank_candidates

    assert candidate_seed(7, 0) == 7  # one candidate is exactly the image made without reflection
    seeds = {candidate_seed(s, c) for s in range(50) for c in range(8)}
    assert len(seeds) == 400 and max(seeds) < 2 ** 62  # no collisions with a prompt's seeds seed + k
    assert rank_candidates([0.2, 0.9, 0.5, 0.9]) == [1, 3, 2, 0]  # ties: the lower candidate index first
    assert rank_candidates([float("nan"), 0.1, float("nan"), 0.3]) == [3, 1, 0, 2]


@pytest.fixture(scope="module")
def trained_folder(trained, tmp_path_factory):
    import tiny_tar

    model, tok, _ = trained
    return tiny_tar.save_tiny_tar(tmp_path_factory.mktemp("reflect") / "tar", model=model, tokenizer=tok)


def _cfg(prompts, tar_folder, output, **kw):
    from tarflow.pipelines.generate import GenerateConfig

    ref = reference_fixture("ta_tok").parent
    kw = {"scale": SCALE, "samples_per_shard": 2, "batch_size": 2, **kw}
    return GenerateConfig(prompts=str(prompts), output=str(output), mllm=tar_folder,
                          tatok=str(ref / "ta_tok" / "ta_tok.pth"), ar_detok=str(ref / "ar_dtok" / "ar_dtok.pth"),
                          vq=str(ref / "vqvae" / "vq.pt"), progress_every_s=0, **kw)


def _tar_json(path) -> dict:
    with tarfile.open(path) as t:
        return {n: json.loads(t.extractfile(n).read()) for n in t.getnames() if n.endswith(".json")}


def test_generate_keeps_the_best_of_n_scores_them_and_resumes(ray_local, sample, trained, trained_folder,
                                                             tmp_path):
    from tarflow.models.reflect import ReflectScorer
    from tarflow.pipelines.generate import run_generate

    captions, _ = sample
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": c, "seed": 10 * i}) + "\n"
                               for i, c in enumerate(captions[:3])))
    out = tmp_path / "gen"
    cfg = _cfg(prompts, trained_folder, out, reflect=True, candidates=3, keep=1, keep_all_scores=True)
    summary = run_generate(cfg)
    assert (summary.shards_done, summary.samples_ok, summary.samples_failed) == (2, 3, 0)
    assert summary.extra["reflect_candidates_scored"] == 9 and summary.extra["reflect_tokens_scored"] > 9 * 40
    assert summary.extra["reflect_tokens_scored_per_s"] > 0
    cands = pq.read_table(out / "reflect" / "00000.parquet").to_pylist() + \
        pq.read_table(out / "reflect" / "00001.parquet").to_pylist()
    assert len(cands) == 9
    meta = _tar_json(out / "00000.tar") | _tar_json(out / "00001.tar")
    by_id = {m["id"]: m for m in meta.values()}
    assert sorted(by_id) == ["p0", "p1", "p2"]
    # the scores, recomputed directly from the written codes, and the selection they imply
    scorer = ReflectScorer(*trained)
    direct = scorer.score([c["prompt"] for c in cands], [c["codes"] for c in cands]).scores
    assert [c["score"] for c in cands] == pytest.approx(direct, abs=1e-5)
    for i in range(3):
        mine = [c for c in cands if c["id"] == f"p{i}"]
        assert [c["candidate"] for c in mine] == [0, 1, 2] and mine[0]["seed"] == 10 * i
        best = max(mine, key=lambda c: (c["score"], -c["candidate"]))
        assert [c["kept"] for c in mine] == [c is best for c in mine] and best["rank"] == 0
        m = by_id[f"p{i}"]
        assert (m["reflect_rank"], m["candidates"], m["reflect_candidate"]) == (0, 3, best["candidate"])
        assert m["reflect_score"] == pytest.approx(best["score"]) and m["codes"] == best["codes"]
        assert m["seed"] == best["seed"]
    assert len({tuple(c["codes"]) for c in cands}) > 3  # the candidates do differ
    # candidate 0 is what the job makes without --reflect: the request's seed, sampled alone
    from tarflow.models.generation import BatchedDecoder, Sampling
    from tarflow.models.mllm import parse_image_codes, t2i_prompt_ids

    model, tok, vocab = trained
    first = [c for c in cands if c["candidate"] == 0]
    alone = BatchedDecoder(model, vocab.pad_id).generate(
        [t2i_prompt_ids(tok, vocab, c["prompt"], SCALE) for c in first], 9, Sampling(**cfg.sampling),
        seeds=[c["seed"] for c in first], allowed_range=(vocab.image_base_id, vocab.image_base_id + 512))
    assert [parse_image_codes(t, vocab, 9)[0] for t in alone.tokens] == [c["codes"] for c in first]
    rows = pq.read_table(out / "00000.parquet").to_pylist()
    assert {"reflect_score", "reflect_rank", "candidates"} <= set(rows[0])
    assert (out / "_manifest" / "00000.json").exists()
    again = run_generate(cfg)
    assert (again.shards_done, again.shards_skipped) == (0, 2)
    with pytest.raises(OutputConflict, match="reflect"):
        run_generate(_cfg(prompts, trained_folder, out, reflect=True, candidates=2, keep=1, keep_all_scores=True))
    with pytest.raises(OutputConflict, match="reflect"):
        run_generate(_cfg(prompts, trained_folder, out))


@pytest.mark.cluster  # a second reflect run, on the diffusion de-tokenizer: `make test-cluster`
def test_keep_k_gives_each_request_k_rows_with_their_own_keys_with_the_diffusion_detokenizer(
        ray_local, trained_folder, tmp_path):
    """K images per request, and the other de-tokenizer (selection happens on codes: only pixels differ)."""
    pytest.importorskip("diffusers")
    from test_diffusion_detok import _save_tiny_sana  # a tiny random SANA reading 36-wide rec features

    from tarflow.pipelines.generate import run_generate

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "A cup of coffee."}) + "\n"
                       + json.dumps({"id": "bad", "prompt": " "}) + "\n"
                       + json.dumps({"id": "b", "prompt": "A rocket."}) + "\n")
    out = tmp_path / "gen"
    summary = run_generate(_cfg(prompts, trained_folder, out, reflect=True, candidates=3, keep=2,
                                samples_per_shard=4, detok="diffusion", diffusion_detok=str(_save_tiny_sana(
                                    tmp_path / "sana")), num_inference_steps=2))
    # a: 2 rows, bad: 1 error row (shard 0, 3 rows); b: 2 rows (shard 1)
    assert (summary.shards_done, summary.samples_ok, summary.samples_failed) == (2, 4, 1)
    meta = _tar_json(out / "00000.tar") | _tar_json(out / "00001.tar")
    assert sorted(meta) == ["000000.json", "000001.json", "000010.json", "000011.json"]
    for first in ("000000.json", "000010.json"):
        nxt = first.replace("0.json", "1.json")
        a, b = meta[first], meta[nxt]
        assert a["id"] == b["id"] and (a["reflect_rank"], b["reflect_rank"]) == (0, 1)
        assert a["reflect_score"] >= b["reflect_score"] and a["reflect_candidate"] != b["reflect_candidate"]
    assert not (out / "reflect").exists()
    manifest = json.loads((out / "_manifest" / "00000.json").read_text())
    assert manifest["detokenizer"]["kind"] == "diffusion" and manifest["reflect"]["keep"] == 2
    assert manifest["counts"]["samples_in"] == 3 and manifest["totals"]["reflect_candidates_scored"] == 3


def test_reflect_flags_are_checked_before_any_work(tmp_path):
    import importlib.util

    from conftest import REPO

    from tarflow.pipelines.generate import GenerateConfig
    from tarflow.preflight import UsageError

    spec = importlib.util.spec_from_file_location("generate_job", REPO / "jobs" / "generate.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    from tarflow.models.reflect import DEFAULT_QUESTION

    assert job.DEFAULT_QUESTION == DEFAULT_QUESTION
    args = job.parse_args(["--prompts", "p", "--output", "o", "--mllm", "m", "--tatok", "t", "--ar-detok", "a",
                           "--vq", "v", "--reflect", "--candidates", "4", "--keep", "2", "--keep-all-scores"])
    assert job.reflect_kwargs(args) == {"reflect": True, "candidates": 4, "keep": 2, "reflect_question": None,
                                        "keep_all_scores": True}
    base = dict(prompts="p.jsonl", output=str(tmp_path), mllm="m", tatok="t")
    with pytest.raises(UsageError, match="--keep: 4 is not in 1..--candidates"):
        GenerateConfig(**base, reflect=True, candidates=3, keep=4).check()
    with pytest.raises(UsageError, match="add --reflect"):
        GenerateConfig(**base, candidates=3).check()
    with pytest.raises(UsageError, match="has no {prompt} field"):
        GenerateConfig(**base, reflect=True, reflect_question="Good?").check()
    GenerateConfig(**base, reflect=True, candidates=4, keep=2).check()
