"""Diffusion de-tokenizer training, on CPU with tiny shapes: the reference's tiny TA-Tok (hidden 36, 3x3 tokens at
scale 3) conditions a tiny SANA (tests/tinysana.py) on the latents (4 x 8 x 8) of a tiny DC-AE at 32 px. Training
data: the bundled sample (8 photos) tokenized with --latents, plus a shard of bad rows.

Learning is measured in-process (no Ray: the Task's own loss and model, a plain AdamW loop); the job script runs
end to end on Ray Train with 2 workers, and a run stopped under FSDP resumes under DDP, in the cluster group
(`make test-cluster`, also run by CI): each Ray Train run costs 30-55 s here.
"""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tinysana
import torch
from conftest import reference_fixture

pytest.importorskip("diffusers")

from tarflow.data.codeshard import read_code_shard  # noqa: E402
from tarflow.data.sample import ensure_sample_shards  # noqa: E402
from tarflow.models.diffusion_detok import NEGATIVE_EMBEDS_FILE, DiffusionDetokenizer  # noqa: E402
from tarflow.pipelines.tokenize import TokenizeConfig, run_tokenize  # noqa: E402
from tarflow.preflight import UsageError  # noqa: E402
from tarflow.train.diffusion_detok import (  # noqa: E402
    DiffusionTask,
    DiffusionTrainConfig,
    FlowMatching,
    assemble,
    preflight,
    split_rows,
)

SCALE, RES, SIDE = 3, 32, 8  # 9 condition tokens (scale 1: 81); 32 px images -> 8 x 8 latents


@pytest.fixture(scope="module")
def data(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusion-data")
    tatok = str(reference_fixture("ta_tok") / "ta_tok.pth")
    sana = tinysana.save_tiny_sana(root / "Tiny-SANA", caption_channels=36, sample_size=SIDE)
    run_tokenize(TokenizeConfig(input=str(ensure_sample_shards()), output=str(root / "tok"), tatok=tatok,
                                scales=[1, SCALE], latents=str(sana), latent_resolution=RES, encode_batch_size=4,
                                decode_batch_size=4, progress_every_s=0))
    good = pa.concat_tables([read_code_shard(str(p)) for p in sorted((root / "tok" / "codes").glob("*.parquet"))])
    assert len(good) == 8
    (root / "more").mkdir()
    pq.write_table(_bad_rows(good), root / "more" / "bad.parquet")
    return {"tatok": tatok, "sana": sana, "tok": str(root / "tok"), "bad": str(root / "more"), "good": good,
            "root": root}


def _bad_rows(good: pa.Table) -> pa.Table:
    """One row per way a row can be bad: no latents, a non-finite latent, a TA-Tok code >= 512, 8 codes."""
    rows = good.slice(0, 4).to_pylist()
    col = f"latents_{RES}"
    rows[0][col] = None
    rows[1][col] = [float("nan")] + rows[1][col][1:]
    rows[2][f"tatok_s{SCALE}"] = [512] + rows[2][f"tatok_s{SCALE}"][1:]
    rows[3][f"tatok_s{SCALE}"] = rows[3][f"tatok_s{SCALE}"][:8]
    i = good.schema.get_field_index(col)
    return pa.Table.from_pylist(rows, schema=good.schema.set(i, good.schema.field(i).with_nullable(True)))


def _stored_latents(table: pa.Table) -> np.ndarray:
    """(rows, 4, 8, 8) float32 latents as stored, unscaled."""
    return np.stack(table.column(f"latents_{RES}").to_numpy(zero_copy_only=False)).astype(np.float32).reshape(
        len(table), tinysana.LATENT_CHANNELS, SIDE, SIDE)


def _config_file(tmp_path) -> str:
    path = tmp_path / "transformer.json"
    # sizes the data gives (channels, sample_size, caption_channels) are wrong here on purpose: taken from the data
    path.write_text(json.dumps({**tinysana.transformer_config(caption_channels=7, sample_size=3, num_layers=2,
                                                              width_heads=4), "in_channels": 99}))
    return str(path)


def _eval_loss(task, model, table, seeds=range(8)) -> float:
    """The flow-matching loss with fixed noise and timesteps (seeded) and no condition dropout."""
    codes, latents, _ = split_rows(table, task.plan)
    x0 = torch.from_numpy(latents) * task.plan.scaling_factor
    losses = []
    with torch.no_grad():
        cond, mask = task.condition(codes, 0.0)
        for s in seeds:
            torch.manual_seed(1000 + s)
            losses.append(float(task.objective.loss(model, x0, cond, mask)))
    return float(np.mean(losses))


def test_bad_rows_are_split_off_and_counted(data):
    cfg = DiffusionTrainConfig(data=[data["tok"], data["bad"]], tatok=data["tatok"], scales=[SCALE, 1],
                               init=str(data["sana"]))
    task = DiffusionTask(cfg, preflight(cfg), torch.device("cpu"))
    plan = task.plan
    assert (plan.n_conds, plan.cond_dim, plan.latents_shape, plan.latents_column) == ([9, 81], 36, [4, 8, 8],
                                                                                        "latents_32")
    assert plan.scaling_factor == pytest.approx(tinysana.SCALING_FACTOR)
    good = data["good"].slice(4, 3)
    bad = _bad_rows(data["good"])
    codes, latents, skipped = split_rows(pa.concat_tables([bad, good.cast(bad.schema)]), plan)
    assert skipped == {"missing": 1, "length": 1, "range": 1, "nonfinite": 1}
    assert np.array_equal(codes[0], np.array(good.column(f"tatok_s{SCALE}").to_pylist()))  # only the good rows
    assert np.array_equal(codes[1], np.array(good.column("tatok_s1").to_pylist()))
    np.testing.assert_array_equal(latents, _stored_latents(good))
    # each row conditions on one of the scales, drawn per row; dropped rows on the null condition
    task.load_model(None)
    torch.manual_seed(0)
    cond, mask = task.condition(codes, 0.0)
    assert cond.shape == (3, 81, 36) and sorted(set(mask.sum(1).tolist())) == [9, 81], mask.sum(1)
    cond, mask = task.condition(codes, 1.0)
    assert mask.sum(1).tolist() == [9] * 3 and torch.all(cond == 0)  # no --init file: the all-zero condition


def test_conditions_of_several_lengths_pad_with_masked_tokens():
    """Rows of a short scale, a long one and the null condition in one batch: each row its own, padded."""
    drop, short, long = torch.tensor([0, 1, 0, 0]).bool(), torch.tensor([1, 0, 0, 1]).bool(), torch.tensor(
        [0, 0, 1, 0]).bool()
    x, mask = assemble([(drop, torch.full((4, 5), 7.0)), (short, torch.ones(2, 2, 5)), (long, torch.ones(1, 6, 5))],
                       4, 5, "cpu")
    assert x.shape == (4, 6, 5) and mask.sum(1).tolist() == [2, 4, 6, 2] and mask[0].tolist() == [1, 1, 0, 0, 0, 0]
    assert torch.all(x[1, :4] == 7) and torch.all(x[0, :2] == 1) and torch.all(x[0, 2:] == 0)


def test_flow_matching_follows_sana_schedule():
    """Timesteps are 1000 x the shifted sigma (what SanaPipeline's DPM-Solver feeds the transformer), drawn
    logit-normal: their median sits at the shifted sigma of u = 0.5."""
    fm = FlowMatching(flow_shift=3.0)
    torch.manual_seed(0)
    sigma, t = fm.sample(20000, "cpu")
    torch.testing.assert_close(t, sigma * 1000)
    assert abs(float(sigma.median()) - 3 * 0.5 / (1 + 2 * 0.5)) < 0.01
    assert 0 < float(sigma.min()) and float(sigma.max()) <= 1


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core machine two threads spin against each other (8x slower measured)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_learns_the_sample_and_its_output_loads_everywhere(data, tmp_path, one_thread):
    """From scratch (a transformer config), the 8 sample rows, plain AdamW on the Task's own loss for STEPS steps:
    the fixed-noise loss falls at least 4-fold (measured: 6.3x), and sampling the saved pipeline (SanaPipeline,
    20 DPM-Solver steps, no CFG) from each sample's codes lands nearer that sample's stored latents than any other
    sample's, every one of the 8 (measured: own 6.9 vs nearest other 9.6 on average)."""
    from diffusers import SanaPipeline

    cfg = DiffusionTrainConfig(data=[data["tok"]], tatok=data["tatok"], scales=[SCALE],
                               transformer_config=_config_file(tmp_path), vae=str(data["sana"]), cond_dropout=0.1,
                               batch_size=8)
    plan = preflight(cfg)
    assert plan["model"]["config"]["in_channels"] == 4 and plan["model"]["config"]["caption_channels"] == 36
    task = DiffusionTask(cfg, plan, torch.device("cpu"))
    model = task.load_model(None).train()
    table = data["good"]
    before = _eval_loss(task, model, table)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(STEPS):
        torch.manual_seed(step)
        loss, sums = task.loss(model, table)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert sums["rows_trained"] == 8
    model.eval()
    after = _eval_loss(task, model, table)
    assert after < before / 4, (before, after)

    out = tmp_path / "pipeline"
    out.mkdir()
    task.save_model(model, str(out))
    null = torch.load(out / NEGATIVE_EMBEDS_FILE, weights_only=True)
    assert null.shape == (9, 36) and torch.all(null == 0)  # no --init file: the all-zero condition
    detok = DiffusionDetokenizer.from_pretrained(out, device="cpu")  # as the generate job loads it
    assert detok.condition_width == 36 and detok.default_size == RES
    # diffusers' own loader; a pipeline without text encoder says so (SANA's model_index lists one)
    pipe = SanaPipeline.from_pretrained(str(out), text_encoder=None, tokenizer=None, local_files_only=True)
    assert pipe.text_encoder is None and pipe.transformer.config.caption_channels == 36

    codes, _, _ = split_rows(table, task.plan)
    with torch.no_grad():
        cond = task.tatok.decode(torch.from_numpy(codes[0])).float()  # (8, 9, 36)
    got = pipe(prompt_embeds=cond, prompt_attention_mask=torch.ones(8, 9, dtype=torch.long), negative_prompt=None,
               guidance_scale=1.0, num_inference_steps=20, height=RES, width=RES, use_resolution_binning=False,
               generator=torch.Generator().manual_seed(0), output_type="latent").images  # (8, 4, 8, 8), scaled
    want = torch.from_numpy(_stored_latents(table)) * tinysana.SCALING_FACTOR
    dist = torch.cdist(got.flatten(1).float(), want.flatten(1))  # (generated, stored)
    own = dist.diagonal()
    others = dist.masked_fill(torch.eye(8, dtype=torch.bool), float("inf")).min(1).values
    assert torch.all(own < others), dist
    assert own.mean() < 0.85 * others.mean(), dist
    # images too, through the de-tokenizer (CFG with the saved null condition)
    images = detok.generate(cond[:2], num_inference_steps=4)
    assert images.shape == (2, RES, RES, 3)
    # the generate job's image stage (--detok diffusion --diffusion-detok OUT) de-tokenizes codes with it
    import tiny_tar

    from tarflow.pipelines.generate import T2IGenerator

    gen = T2IGenerator(mllm=tiny_tar.save_tiny_tar(tmp_path / "tar", hidden=16, heads=2, kv_heads=1),
                       tatok=data["tatok"], detok="diffusion", diffusion=str(out), device="cpu",
                       detok_sampling={"num_inference_steps": 2})
    pixels = gen._pixels(data["good"].column(f"tatok_s{SCALE}").to_pylist()[:2], seeds=[1, 2])
    assert pixels.shape == (2, RES, RES, 3) and pixels.dtype == np.uint8


STEPS = 400  # 8-13 s on one CPU thread of the shared machine


def _job():
    spec = importlib.util.spec_from_file_location("train_diffusion_detok", os.path.join(
        os.path.dirname(__file__), "..", "jobs", "train_diffusion_detok.py"))
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


def _job_args(data, init, storage, name) -> list[str]:
    """4 steps of 2 workers x 3 rows, a checkpoint every 2, half the rows dropped to the null condition."""
    return ["--data", data["tok"], data["bad"], "--tatok", data["tatok"], "--scales", f"{SCALE},1", "--init",
            str(init), "--steps", "4", "--batch-size", "3", "--lr", "1e-3", "--warmup-ratio", "0",
            "--checkpoint-every", "2", "--log-every", "2", "--num-workers", "2", "--cpus-per-worker", "0.5",
            "--shuffle-buffer", "0", "--storage-path", str(storage), "--name", name, "--cond-dropout", "0.5"]


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """Fine-tune a copy of the tiny pipeline that ships a negative_prompt_embeds.pth (as Tar's folders do) with
    2 Ray Train workers, through the job script."""
    import shutil

    root = tmp_path_factory.mktemp("straight")
    init = root / "Tiny-SANA-neg"
    shutil.copytree(data["sana"], init)
    neg = torch.randn(5, 36, generator=torch.Generator().manual_seed(3))
    torch.save(neg, init / NEGATIVE_EMBEDS_FILE)  # the dropped rows' condition
    job = _job()
    rc = job.main(_job_args(data, init, root / "runs", "ft")
                  + ["--output", str(root / "Tar-SANA-ft"), "--summary-json", str(root / "s.json")])
    assert rc == 0
    return {"job": job, "init": init, "neg": neg, "runs": root / "runs", "out": root / "Tar-SANA-ft",
            "summary": json.loads((root / "s.json").read_text())}


def test_job_script_arguments(capsys):
    job = _job()
    with pytest.raises(SystemExit) as e:
        job.parse_args(["--help"])
    assert e.value.code == 0 and "--flow-shift" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        job.parse_args(["--data", "x", "--tatok", "t.pth"])  # no model
    with pytest.raises(SystemExit):
        job.parse_args(["--data", "x", "--tatok", "t.pth", "--transformer-config", "sana-600m"])  # no --vae
    with pytest.raises(SystemExit):
        job.parse_args(["--data", "x", "--tatok", "t.pth", "--init", "i", "--scales", "1,two"])
    cfg = job.config_from_args(job.parse_args(["--data", "x", "--tatok", "t.pth", "--init", "i", "--scales", "1,3"]))
    assert cfg.scales == [1, 3] and cfg.optim.lr == 1e-4 and cfg.cond_dropout == 0.1 and cfg.keep_checkpoints == 2


@pytest.mark.cluster  # a Ray Train run of 2 workers (30-55 s on the shared 2-core machine): `make test-cluster`
def test_job_script_two_workers_on_ray_train(data, straight, tmp_path):
    """Fine-tune the tiny pipeline (--init) with 2 Ray Train workers through the job script; bad rows are counted;
    the output pipeline folder loads, with the init's null condition; a rerun on the same run refuses other data."""
    s, out = straight["summary"], straight["out"]
    assert [h["step"] for h in s["history"]] == [1, 2, 3, 4]
    # 12 rows = 2 steps of 2 workers x 3 rows: two epochs, the 4 bad rows skipped (and counted) in each
    assert [h["epoch"] for h in s["history"]] == [0, 0, 1, 1]
    assert sum(h["rows"] for h in s["history"]) == 24 and sum(h["rows_trained"] for h in s["history"]) == 16
    assert s["metrics"]["skipped_total"] == 8 and all(np.isfinite(h["loss"]) for h in s["history"])
    assert not (out / "trainer_state.pt").exists() and (out / "vae" / "config.json").is_file()
    torch.testing.assert_close(torch.load(out / NEGATIVE_EMBEDS_FILE, weights_only=True), straight["neg"])
    detok = DiffusionDetokenizer.from_pretrained(out, device="cpu")
    assert tuple(detok.negative_embeds.shape) == (5, 36)
    trained = detok.pipe.transformer.state_dict()
    from diffusers import SanaTransformer2DModel

    base = SanaTransformer2DModel.from_pretrained(str(straight["init"]), subfolder="transformer").state_dict()
    assert any(not torch.equal(trained[k], base[k]) for k in base)  # it trained
    # a rerun of the run on other data (here: other files) is refused before Ray starts
    pq.write_table(data["good"], tmp_path / "copy.parquet")
    from tarflow.train.diffusion_detok import run_train

    with pytest.raises(UsageError, match="'ft' .* was trained on other data \\(files differ"):
        run_train(DiffusionTrainConfig(data=[str(tmp_path / "copy.parquet")], tatok=data["tatok"], scales=[SCALE, 1],
                                       init=str(straight["init"]), storage_path=str(straight["runs"]), name="ft"))


@pytest.mark.cluster  # two more Ray Train runs (~30 s each on 2 cores): run by `make test-cluster`
def test_stopped_under_fsdp_and_resumed_under_ddp_reaches_the_straight_runs_weights(data, straight, tmp_path):
    """2 steps under FSDP (FSDP2 per transformer block, gloo on CPU), then the last 2 under DDP from its checkpoint:
    the straight DDP run's weights. So the gathered FSDP checkpoint is the DDP one, and the optimiser state,
    schedule, data positions, per-step seeds (noise, timesteps, scales, dropout) and the null condition resume."""
    from safetensors.torch import load_file

    from tarflow.train.diffusion_detok import run_train

    job = straight["job"]
    cfg = job.config_from_args(job.parse_args(_job_args(data, straight["init"], tmp_path / "runs", "split")))
    cfg.strategy, cfg.stop_at_step = "fsdp", 2
    assert run_train(cfg).steps == 2
    cfg.strategy, cfg.stop_at_step, cfg.output = "ddp", None, str(tmp_path / "out")
    result = run_train(cfg)
    assert result.starts == [0, 2] and [h["step"] for h in result.history] == [1, 2, 3, 4]
    assert [h["loss"] for h in result.history] == pytest.approx([h["loss"] for h in straight["summary"]["history"]])
    want = load_file(straight["out"] / "transformer" / "diffusion_pytorch_model.safetensors")
    got = load_file(tmp_path / "out" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4)


def test_init_from_s3(data, s3_bucket, tmp_path):
    """--init s3://...: the driver reads the folder's configs and hashes its vae/ in place (it made the latents, so
    it fits); a worker copies the folder (without a text encoder) and trains and saves from it."""
    import s3fs

    s3fs.S3FileSystem().put(str(data["sana"]), f"{s3_bucket}/models/Tiny-SANA", recursive=True)
    cfg = DiffusionTrainConfig(data=[data["tok"]], tatok=data["tatok"], scales=[SCALE],
                               init=f"{s3_bucket}/models/Tiny-SANA")
    plan = preflight(cfg)
    assert plan["model"]["vae"] == f"{s3_bucket}/models/Tiny-SANA/vae" and plan["model"]["flow_shift"] == 3.0
    task = DiffusionTask(cfg, plan, torch.device("cpu"))
    model = task.load_model(None)
    loss, sums = task.loss(model, data["good"])
    assert sums["rows_trained"] == 8 and float(loss) > 0
    task.save_model(model, str(tmp_path / "ckpt"))
    assert DiffusionDetokenizer.from_pretrained(tmp_path / "ckpt", device="cpu").condition_width == 36
    # --output s3://...: the checkpoint folder is streamed there file by file, and loads from there
    from tarflow.data.storage import copy_folder

    (tmp_path / "ckpt" / "trainer_state.pt").write_bytes(b"the core's, not the model's")
    copy_folder(str(tmp_path / "ckpt"), f"{s3_bucket}/out/ft", skip=("trainer_state.pt",))
    remote = DiffusionDetokenizer.from_pretrained(f"{s3_bucket}/out/ft", device="cpu", cache_dir=tmp_path / "cache")
    assert remote.condition_width == 36 and not s3fs.S3FileSystem().exists(f"{s3_bucket}/out/ft/trainer_state.pt")


def test_wrong_vae_and_misfits_are_refused_before_ray(data, tmp_path):
    other_vae = tinysana.save_tiny_vae(tmp_path / "other-vae", seed=5)
    with pytest.raises(UsageError) as e:
        preflight(DiffusionTrainConfig(data=[data["tok"]], tatok=data["tatok"], scales=[SCALE],
                                       transformer_config="sana-600m", vae=str(other_vae)))
    assert "did not make the latents of --data" in str(e.value)
    misfit = tinysana.save_tiny_sana(tmp_path / "misfit", caption_channels=20, sample_size=SIDE)
    with pytest.raises(UsageError) as e:
        preflight(DiffusionTrainConfig(data=[data["tok"]], tatok=data["tatok"], scales=[SCALE], init=str(misfit)))
    assert "caption_channels 20 != the TA-Tok's hidden size 36" in str(e.value)
    torch.save(torch.zeros(4, 20), misfit / NEGATIVE_EMBEDS_FILE)
    with pytest.raises(UsageError) as e:
        preflight(DiffusionTrainConfig(data=[data["tok"]], tatok=data["tatok"], scales=[SCALE], init=str(misfit)))
    assert "negative_prompt_embeds.pth: is (4, 20), not the null condition (L, 36)" in str(e.value)
    with pytest.raises(UsageError) as e:
        preflight(DiffusionTrainConfig(data=[data["tok"]], tatok=data["tatok"], scales=[2, 3],
                                       init=str(data["sana"])))
    assert "no tatok_s2 column" in str(e.value)


def test_bench_diffusion_step_runs_tiny(tmp_path, one_thread):
    """bench/gpu_train.py --diffusion's step on CPU with a tiny SANA: images/s and MFU come out, and the FLOPs
    counted for a step are those of the model (3 x the forward's), not the depthwise-convolution overcount."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from bench.common import Results
    from bench.gpu_train import diffusion_throughput

    res = Results("t", str(tmp_path / "b.json"))
    diffusion_throughput("cpu", tiny=True, steps=1, batch=2, peak=1e12, res=res)
    f = json.loads((tmp_path / "b.json").read_text())["figures"]
    assert f["diffusion_images_per_s"] > 0 and 0 < f["diffusion_mfu"] < 1
    # the tiny SANA's forward is ~16 MFLOP per image (2 layers of width 64 on 64 tokens, Mix-FFN ratio 2.5)
    assert 30e6 < f["diffusion_flops_per_image"] < 70e6, f
