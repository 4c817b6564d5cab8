"""What a new user meets first: checks before Ray starts, one-line errors, clean interrupts, quiet logs, demo models."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import textwrap
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from tarflow.data import schema
from tarflow.pipelines import runtime

JOBS = os.path.join(os.path.dirname(__file__), "..", "jobs")


def _job(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(JOBS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def no_ray_start(monkeypatch):
    """Fail the test if a job tries to start Ray (the checks must come first)."""
    def refuse(*a, **kw):
        raise AssertionError("Ray was started before the arguments were checked")

    monkeypatch.setattr(runtime, "init_ray", refuse)


def _fake_code_shards(folder, scales=(1, 3), codebook=1024):
    """A tokenize output folder with one code shard (footer and manifest), enough for the driver-side checks."""
    facts = {"scales": list(scales), "model": {"codebook_size": codebook}}
    table = schema.with_metadata(schema.code_shard_schema(scales, codebook), schema.CODE_SHARD_FORMAT,
                                 schema.CODE_SHARD_VERSION, facts).empty_table()
    os.makedirs(folder / "codes")
    os.makedirs(folder / "_manifest")
    pq.write_table(table, folder / "codes" / "00000.parquet")
    (folder / "_manifest" / "00000.json").write_text("{}")
    return folder


def _errors(text):
    return [ln for ln in text.splitlines() if ln.startswith("error: ")]


def test_caption_reports_every_problem_at_once_before_ray(tmp_path, capsys, no_ray_start):
    from tarflow.data.sample import ensure_sample_shards

    # img2dataset input instead of code shards, a missing model, an output nobody can write
    rc = _job("caption").main(["--input", str(ensure_sample_shards()), "--model", str(tmp_path / "no-model"),
                               "--output", "/proc/tarflow-test/out"])
    errors = _errors(capsys.readouterr().err)
    assert rc == 2 and len(errors) == 3, errors
    assert "holds img2dataset shards (.tar), not code shards; give the tokenize job's output folder" in errors[0]
    assert f"--model {tmp_path / 'no-model'}: not found" in errors[1]
    assert "--output /proc/tarflow-test/out: /proc is not writable" in errors[2]

    # the scale asked for against the shards' footer; a model folder without tokenizer files
    codes = _fake_code_shards(tmp_path / "tok")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"x")
    rc = _job("caption").main(["--input", str(codes), "--model", str(model), "--scale", "2",
                               "--output", str(tmp_path / "out")])
    errors = _errors(capsys.readouterr().err)
    assert rc == 2 and len(errors) == 2, errors
    assert errors[0] == f"error: --scale 2: the code shards in {codes} hold scales [1, 3]; pass --scale 1"
    assert f"--model {model}: not a Hugging Face model folder: no tokenizer files" in errors[1]
    assert not (tmp_path / "out").exists()


def test_generate_and_tokenize_sniff_checkpoints_and_inputs(tmp_path, capsys, no_ray_start):
    good = tmp_path / "good.pth"
    buf = io.BytesIO()
    torch.save({"model": {"w": torch.zeros(4096)}}, buf)
    good.write_bytes(buf.getvalue())
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    html = tmp_path / "error-page.pth"
    html.write_bytes(b"<html>" + b" " * 2000)
    rc = _job("generate").main(["--prompts", str(tmp_path / "none.jsonl"), "--mllm", str(good),
                                "--tatok", str(truncated), "--ar-detok", str(html), "--vq", str(good),
                                "--output", str(tmp_path / "out")])
    errors = _errors(capsys.readouterr().err)
    assert rc == 2 and len(errors) == 4, errors
    assert "--prompts" in errors[0] and "not found" in errors[0]
    assert f"--mllm {good}: is a file, not a folder" in errors[1]
    assert f"--tatok {truncated}: is truncated or damaged" in errors[2]
    assert f"--ar-detok {html}: is not a torch checkpoint" in errors[3]

    # the tokenize job given its own output, and an output that is a file
    out = _fake_code_shards(tmp_path / "codes-out")
    rc = _job("tokenize_laion").main(["--input", str(out), "--output", str(out / "codes" / "00000.parquet"),
                                      "--tatok", str(good)])
    errors = _errors(capsys.readouterr().err)
    assert rc == 2 and len(errors) == 2, errors
    assert "is a tokenize job's output (code shards), not img2dataset shards" in errors[0]
    assert "is a file, not a folder" in errors[1]


def test_relative_output_is_refused_under_ray_job_submit(tmp_path, capsys, monkeypatch, no_ray_start):
    """Under `ray job submit` the driver runs in Ray's temporary copy of the working dir: a relative output would
    be written there and vanish with it."""
    pkg = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    pkg.mkdir(parents=True)
    monkeypatch.chdir(pkg)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://x.zip"}}))
    rc = _job("tokenize_laion").main(["--output", "out/tokenize-sample"])
    errors = _errors(capsys.readouterr().err)
    assert rc == 2 and len(errors) == 1
    assert "--output out/tokenize-sample: is relative: under `ray job submit` it would land in Ray's temporary " \
           "copy of the working dir and vanish" in errors[0]
    assert 'give an absolute path, e.g. --output "$PWD/out/tokenize-sample"' in errors[0]
    assert not (pkg / "out").exists()


def test_a_failure_inside_an_actor_is_one_unwrapped_line_with_the_traceback_kept(ray_local, tmp_path, capsys):
    """A model folder that passes the file checks but does not load: the caption actor fails in its constructor;
    the user gets the loader's one line (not Ray's wrappers) and the path of the full traceback."""
    codes = _fake_code_shards(tmp_path / "tok")
    # one row, so that an actor is needed
    facts = {"scales": [1, 3], "model": {"codebook_size": 1024}}
    sch = schema.with_metadata(schema.code_shard_schema([1, 3], 1024), schema.CODE_SHARD_FORMAT,
                               schema.CODE_SHARD_VERSION, facts)
    row = {f.name: None for f in sch}
    row.update(key="k0", sha256="0" * 64, width=1, height=1, tatok_s1=[1] * 4, tatok_s3=[1])
    pq.write_table(pa.Table.from_pylist([row], schema=sch), codes / "codes" / "00000.parquet")
    model = tmp_path / "llama"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (model / "model.safetensors").write_bytes(b"x")
    (model / "tokenizer.json").write_text("{}")
    rc = _job("caption").main(["--input", str(codes), "--model", str(model), "--output", str(tmp_path / "out"),
                               "--no-progress"])
    err = capsys.readouterr().err
    errors = _errors(err)
    assert rc == 2 and len(errors) == 1, err[-3000:]
    line = errors[0]
    assert f"CheckpointError: checkpoint {model}: config.json describes a 'llama' model, not 'qwen2'" in line
    assert "ray::" not in line and "RayTaskError" not in line and len(line) <= 400
    log_path = line.rsplit("(traceback: ", 1)[1].rstrip(")")
    assert "Traceback" in open(log_path).read()
    assert "Traceback" not in err  # the traceback went to the file, not to the screen


def test_errors_and_interrupts_outside_the_pipeline(capsys):
    from tarflow.pipelines.sharded import JobSummary

    def raise_(e):
        def run(cfg):
            raise e
        return run

    long = "x" * 1000
    assert runtime.run_job(raise_(ValueError(long)), None, None) == 2
    assert max(len(ln) for ln in capsys.readouterr().err.splitlines()) <= 310  # long messages are cut

    # Ctrl-C while planning or loading models: no traceback, a line saying nothing was written, 130
    assert runtime.run_job(raise_(KeyboardInterrupt()), None, None) == 130
    assert "interrupted (SIGINT) before any shard was written" in capsys.readouterr().err

    def sigterm_while_loading(cfg):  # `ray job stop` while a model loads
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("SIGTERM did not stop the job")

    before = signal.getsignal(signal.SIGTERM)
    assert runtime.run_job(sigterm_while_loading, None, None) == 143
    assert "interrupted (SIGTERM) before any shard was written" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored

    summary = JobSummary(job="demo", shards_total=5, shards_done=2, shards_skipped=1, output="out/x",
                         interrupted=True)

    def stopped_by_sigterm(cfg):  # what the pipelines return when SIGTERM arrives while shards are written
        runtime._stop_signal["signum"] = signal.SIGTERM
        return summary

    assert runtime.run_job(stopped_by_sigterm, None, None) == 143
    out = capsys.readouterr().out
    assert "2 shards written, 1 skipped" in out and f"output: {os.path.abspath('out/x')}" in out
    assert "interrupted (SIGTERM): 2 shards not finished; rerun the same command to resume" in out


SLOW_TOKENIZE = textwrap.dedent("""
    import sys, time
    from tarflow.pipelines import runtime, tokenize

    class SlowEncoder(tokenize.TATokEncoder):
        def __call__(self, batch):
            time.sleep(2.0)
            return super().__call__(batch)

    def main(argv):
        runtime.setup_logging()
        cfg = tokenize.TokenizeConfig(input=[argv[0]], output=argv[1], tatok=argv[2], scales=[1],
                                      encode_batch_size=1, decode_batch_size=1, max_concurrent_shards=1,
                                      progress_every_s=0)
        return runtime.run_job(lambda c: tokenize.run_tokenize(c, encoder_cls=SlowEncoder), cfg, None,
                               start=lambda: runtime.init_ray(num_cpus=2))

    sys.exit(main(sys.argv[1:]))
""")


def test_sigterm_stops_a_running_job_with_its_summary_and_a_rerun_resumes(ray_local, tmp_path):
    """SIGTERM (what `ray job stop` sends) to a job between shards: exit 143, no traceback, the summary with what
    is left; its log is quiet (no token-auth warning, no core_worker error line, no control codes) and has a
    line per finished shard. The rerun skips the finished shards and does the rest."""
    from tarflow.data.sample import sample_photos, write_img2dataset_shards
    from tarflow.models.demo import ensure_random_tatok
    from tarflow.pipelines.tokenize import TokenizeConfig, run_tokenize

    shards = tmp_path / "i2d"
    write_img2dataset_shards(shards, sample_photos(), samples_per_shard=1)  # 8 shards of one photo
    out = tmp_path / "out"
    script = tmp_path / "slow_tokenize.py"
    script.write_text(SLOW_TOKENIZE)
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}  # as on a fresh machine
    env["HOME"] = str(tmp_path / "home")
    tatok = str(ensure_random_tatok())
    proc = subprocess.Popen([sys.executable, str(script), str(shards), str(out), tatok], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600  # generous: on a busy machine Ray alone may take minutes to start
    while time.time() < deadline and proc.poll() is None:
        if (out / "_manifest").is_dir() and len(os.listdir(out / "_manifest")) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None and len(os.listdir(out / "_manifest")) >= 2, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    written = int(re.search(r"tarflow tokenize: (\d+) shards written, 0 skipped \(already done\), 0 failed, of 8",
                            stdout).group(1))
    done = len(os.listdir(out / "_manifest"))  # one more if the signal came between a manifest and its count
    assert 1 <= written <= done <= written + 1 and done < 8, (written, done)
    assert f"interrupted (SIGTERM): {8 - written} shards not finished; rerun the same command to resume" in stdout
    assert f"output: {out}" in stdout
    # quiet logs: nothing the user cannot act on, no progress bars' control codes, a line per finished shard
    log = stdout + stderr
    assert "Token authentication" not in log and "core_worker.cc" not in log, log[-3000:]
    assert "\r" not in log and "\x1b[" not in log
    assert sum("tarflow INFO: tokenize progress:" in ln for ln in stderr.splitlines()) >= written
    assert (tmp_path / "home" / ".ray" / "auth_token").exists()  # Ray's token auth stayed on, quietly

    resumed = run_tokenize(TokenizeConfig(input=[str(shards)], output=str(out), tatok=tatok, scales=[1],
                                          progress_every_s=0))
    assert (resumed.shards_skipped, resumed.shards_done, resumed.samples_ok) == (done, 8 - done, 8 - done)


def test_demo_models_are_a_consistent_labelled_family(tmp_path):
    from tarflow.data import sample
    from tarflow.models import demo
    from tarflow.models.ar_detok import ARDetokenizer
    from tarflow.models.detokenize import ARImageDecoder
    from tarflow.models.mllm import i2t_prompt_ids, load_tar
    from tarflow.models.tatok import TATok
    from tarflow.models.vqvae import VQVAE

    paths = {"tatok": demo.ensure_random_tatok(), "vq": demo.ensure_demo_vq(),
             "ar": demo.ensure_demo_ar_detok(), "base": demo.ensure_demo_base(), "tar": demo.ensure_demo_tar()}
    for p in paths.values():
        folder = p if p.is_dir() else p.parent
        assert "RANDOM-UNTRAINED" in folder.name and "UNTRAINED" in (folder / "README.txt").read_text()
    tatok, vq = TATok.from_checkpoint(str(paths["tatok"])), VQVAE.from_checkpoint(str(paths["vq"]))
    ar = ARDetokenizer.from_checkpoint(str(paths["ar"]))
    decoder = ARImageDecoder(tatok, ar, vq)  # checks condition width and vocabulary
    codes = torch.randint(0, tatok.codebook_size, (1, tatok.num_tokens(3)), generator=torch.Generator().manual_seed(0))
    image = decoder(codes, generator=torch.Generator().manual_seed(0))
    assert image.shape == (1, demo.DEMO_VQ_RESOLUTION, demo.DEMO_VQ_RESOLUTION, 3) and image.dtype == torch.uint8
    model, tok, vocab = load_tar(str(paths["tar"]))
    assert vocab.num_image_tokens == tatok.codebook_size and len(tok) < 2000
    text = tok.decode(i2t_prompt_ids(tok, vocab, [1, 2], sample.DEMO_QUESTION))
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<I1><I2>\n"
                    "Describe the image shortly.<|im_end|>\n<|im_start|>assistant\n")
    # image rows are the TA-Tok codebook, as the trainer makes them
    rows = model.get_input_embeddings().weight[vocab.image_base_id:vocab.image_base_id + vocab.num_image_tokens]
    assert torch.equal(rows, tatok.bottleneck.regularizer.codebook().detach())
    # made with fixed seeds: the same tokenizer and weights every time
    assert demo.demo_tokenizer().backend_tokenizer.to_str() == demo.demo_tokenizer().backend_tokenizer.to_str()
    again = demo.ensure_demo_vq(tmp_path / "home2")
    assert again.read_bytes() == paths["vq"].read_bytes()


# generate on the demo models also runs in make test (tests/test_edit.py); this fuller run: `make test-cluster`
@pytest.mark.cluster
def test_generate_with_no_model_arguments_runs_on_the_demo_models(ray_local, tmp_path, capsys, caplog):
    """The demo family, with self-reflection: the demo tokenizer has single-token yes/no answers, as Qwen2's."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "A cat."}\n{"id": "b", "prompt": "A rocket."}\n')
    rc = _job("generate").main(["--prompts", str(prompts), "--output", str(tmp_path / "out"), "--scale", "3",
                                "--no-progress", "--reflect", "--candidates", "2", "--keep", "1"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    assert "RANDOM, UNTRAINED demo model" in caplog.text and "images: 2 in = 2 ok + 0 failed" in captured.out
    assert "Traceback" not in captured.err
    rows = pq.read_table(tmp_path / "out" / "00000.parquet").to_pylist()
    assert len(rows) == 2 and all(0.0 < r["reflect_score"] < 1.0 and r["candidates"] == 2 for r in rows)
    # --detok diffusion with no model argument: the demo SANA (its 64 px images)
    prompts.write_text('{"id": "a", "prompt": "A cat."}\n')
    rc = _job("generate").main(["--prompts", str(prompts), "--output", str(tmp_path / "out-sana"), "--scale", "3",
                                "--detok", "diffusion", "--steps", "2", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0 and "images: 1 in = 1 ok + 0 failed" in captured.out, captured.err[-3000:]
    with tarfile.open(tmp_path / "out-sana" / "00000.tar") as tar:
        png = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".png")]
    assert len(png) == 1 and Image.open(io.BytesIO(png[0])).size == (64, 64)
