"""hf:// paths end to end against a local stand-in of the Hugging Face Hub (tests/hubstandin.py, HF_ENDPOINT).

huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE when it is imported (the session runs with
HF_HUB_OFFLINE=1), so the jobs run in subprocesses with their own environment: the error checks as plain job
commands, the jobs themselves through tests/jobrunner.py (one Ray for several jobs). Every test has its own
HF_HOME, i.e. its own empty hub cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, reference_fixture

TATOK = "hf://csuhan/TA-Tok/ta_tok.pth"
VQ = "hf://peizesun/llamagen_t2i/vq_ds16_t2i.pt"
AR = "hf://csuhan/TA-Tok/ar_dtok_lp_256px.pth"
TAR = "hf://tarflow-test/Tar-tiny"
SHARDS = "hf://datasets/tarflow-test/sample-shards/shards/*.tar"
PROMPTS = "hf://datasets/tarflow-test/sample-shards/prompts.jsonl"
WAIT_S = 900  # generous: the machine may be loaded


def hub_env(hub, hf_home, offline: bool = False, token: str | None = None) -> dict:
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1" if offline else "0"}
    for k in ("HF_HUB_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "RAY_ADDRESS"):
        env.pop(k, None)
    if token:
        env["HF_TOKEN"] = token
    return env


def run_job(name: str, argv: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / f"{name}.py"), *argv], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=WAIT_S)


class JobRunner:
    """tests/jobrunner.py in a subprocess: jobs one after another on one private Ray, in `env`."""

    def __init__(self, env: dict, log):
        self.log = log
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "jobrunner.py")], env=env, cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
        assert json.loads(self._line())["ready"]

    def _line(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"jobrunner ended (rc {self.proc.wait()}): {open(self.log).read()[-3000:]}")
        return line

    def __call__(self, job: str, *argv: str) -> dict:
        self.proc.stdin.write(json.dumps({"job": job, "argv": list(argv)}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._line())

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _ok(r: dict) -> dict:
    assert r["rc"] == 0, r["stderr"][-3000:] + r["stdout"][-1000:]
    return r


def _summary(path) -> dict:
    return json.loads(open(path).read())


def test_hub_paths_that_cannot_serve_are_one_line_each_before_ray_starts(hub_standin, tmp_path):
    hub = hub_standin
    hub.reset_counts()
    env = hub_env(hub, tmp_path / "hf")
    bad = {"--input": "hf://datasets/tarflow-test/sample-shards@v9/shards",
           "--tatok": "hf://csuhan/TA-Tok/no_such.pth",
           "--vq": "hf://tarflow-test/gated/ta_tok.pth",
           "--latents": "hf://csuhan/Nowhere/vae"}
    r = run_job("tokenize_laion", [a for kv in bad.items() for a in kv] + ["--output", "hf://me/out"], env)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(lines) == 5, r.stderr[-3000:]
    assert any(ln.startswith("error: --output hf://me/out: tarflow reads from the Hugging Face Hub but does not "
                             "write to it; give a local folder or an s3:// prefix") for ln in lines), lines
    want = {"--input": "revision 'v9' not found in tarflow-test/sample-shards",
            "--tatok": "no file or folder 'no_such.pth' in csuhan/TA-Tok",
            "--vq": "tarflow-test/gated is a gated repo and this token has no access to it; accept its conditions",
            "--latents": "repository csuhan/Nowhere not found"}
    for flag, text in want.items():
        line = next(ln for ln in lines if ln.startswith(f"error: {flag} {bad[flag]}: "))
        assert text in line and "; " in line, line
    assert "HF_TOKEN" in next(ln for ln in lines if "--vq" in ln)
    assert not any("/resolve/" in p and m == "GET" for m, p in hub.requests)  # nothing downloaded
    assert "Started a local Ray" not in r.stdout + r.stderr

    # the same gated file with a token that was granted access: pinned to the commit
    code = "from tarflow.data import hub; print(hub.pin('hf://tarflow-test/gated/ta_tok.pth'))"
    got = subprocess.run([sys.executable, "-c", code], env=hub_env(hub, tmp_path / "hf", token="hf_test_token"),
                         cwd=REPO, capture_output=True, text=True, timeout=WAIT_S)
    sha = hub.repos[("model", "tarflow-test/gated")].refs["main"]
    assert got.stdout.strip() == f"hf://tarflow-test/gated@{sha}/ta_tok.pth", got.stderr[-2000:]

    # offline with an empty cache: says so, and asks nothing
    hub.reset_counts()
    r = run_job("caption", ["--input", str(tmp_path), "--model", TAR, "--output", str(tmp_path / "cap")],
                hub_env(hub, tmp_path / "empty-hf", offline=True))
    assert r.returncode == 2, r.stderr[-2000:]
    line = next(ln for ln in r.stderr.splitlines() if ln.startswith(f"error: --model {TAR}: "))
    assert "not in the local Hugging Face cache and HF_HUB_OFFLINE=1" in line and "unset HF_HUB_OFFLINE" in line
    assert hub.requests == []


@pytest.fixture(scope="module")
def hub_with_tar(hub_standin, tmp_path_factory):
    """The stand-in with a tiny Tar MLLM folder as model repo tarflow-test/Tar-tiny."""
    import tiny_tar

    if ("model", "tarflow-test/Tar-tiny") not in hub_standin.repos:
        tar = tiny_tar.save_tiny_tar(tmp_path_factory.mktemp("hub-tar") / "Tar-tiny", hidden=16, heads=2, kv_heads=1)
        hub_standin.add_folder("tarflow-test/Tar-tiny", tar)
    return hub_standin


def test_dataset_files_read_by_ranges_and_fail_alone_when_no_retry_can_help(hub_standin, tmp_path):
    """A shard of a dataset repo reads as an S3 shard does (by ranges, through the retrying reader); a file gone
    from the repo and a gated repo's file fail at once as not_found / access_denied (no retries: they are OSErrors,
    which the reader otherwise retries as transient)."""
    hub = hub_standin
    if ("dataset", "tarflow-test/gated-shards") not in hub.repos:
        hub.add_commit("tarflow-test/gated-shards", {"00000.tar": b"x" * 4096}, repo_type="dataset", gated=True)
    sha = hub.repos[("dataset", "tarflow-test/sample-shards")].refs["main"]
    code = f"""
import json
from tarflow.data.retrying_file import ReadRetry, RetryingFile, ShardReadError
out = {{}}
f = RetryingFile("hf://datasets/tarflow-test/sample-shards@{sha}/shards/00000.tar", block_size=1024)
f.seek(512); out["ok"] = [f.size, f.read(8).hex(), f.retries]
for name, url in [("gone", "hf://datasets/tarflow-test/sample-shards@{sha}/shards/99999.tar"),
                  ("gated", "hf://datasets/tarflow-test/gated-shards/00000.tar")]:
    sleeps = []
    try:
        g = RetryingFile(url, retry=ReadRetry(attempts=3), sleep=sleeps.append)
        g.read(16)
        out[name] = "read"
    except ShardReadError as e:
        out[name] = [e.reason, len(sleeps)]
print(json.dumps(out))
"""
    hub.reset_counts()
    r = subprocess.run([sys.executable, "-c", code], env=hub_env(hub, tmp_path / "hf"), cwd=REPO,
                       capture_output=True, text=True, timeout=WAIT_S)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    data = hub.repos[("dataset", "tarflow-test/sample-shards")].commits[sha]["shards/00000.tar"]
    assert got["ok"] == [len(data), data[512:520].hex(), 0]
    assert got["gone"] == ["not_found", 0] and got["gated"] == ["access_denied", 0]
    assert hub.range_reads[("dataset", "tarflow-test/sample-shards", "shards/00000.tar")] >= 1
    assert not hub.downloads  # nothing fetched whole


def _model_downloads(hub) -> dict:
    """{(repo, path): whole-file GETs} of the model repos (dataset files are read by ranges, small ones whole)."""
    return {(repo, path): n for (t, repo, path), n in hub.downloads.items() if t == "model"}


@pytest.mark.cluster  # minutes on 2 cores: the heavier group (make test-cluster)
def test_tokenize_and_caption_take_models_and_data_from_the_hub_once_per_node(hub_with_tar, tmp_path):
    """tokenize (a dataset glob, 2 encoder actors) and caption with hf:// arguments on one node: every model file
    is downloaded once into the hub cache, dataset shards are read by ranges; the outputs' facts name the commit;
    a rerun after the repo moved on conflicts, a pinned one resumes; offline, the filled cache serves alone."""
    import pyarrow.parquet as pq

    hub = hub_with_tar
    hub.reset_counts()
    ta_tok = (reference_fixture("ta_tok") / "ta_tok.pth").read_bytes()
    commit = hub.repos[("model", "csuhan/TA-Tok")].refs["main"]
    tok, cap = tmp_path / "tok", tmp_path / "cap"
    tok_args = ["--input", SHARDS, "--output", str(tok), "--tatok", TATOK, "--scales", "1,3", "--num-encoders", "2",
                "--encode-batch-size", "4", "--decode-batch-size", "4", "--no-progress"]
    cap_args = ["--input", str(tok), "--model", TAR, "--scale", "3", "--max-new-tokens", "4", "--no-progress"]
    jobs = JobRunner(hub_env(hub, tmp_path / "hf"), tmp_path / "runner.log")
    try:
        _ok(jobs("tokenize_laion", *tok_args, "--summary-json", str(tmp_path / "tok.json")))
        assert _summary(tmp_path / "tok.json")["samples_ok"] == 8
        facts = (tok / "_manifest" / "00000.json").read_text()
        assert f"hf://csuhan/TA-Tok@{commit}/ta_tok.pth" in facts and hashlib.sha256(ta_tok).hexdigest() in facts
        # the same model as a local file is the same model: the run resumes (nothing to do)
        _ok(jobs("tokenize_laion", *[str(reference_fixture("ta_tok") / "ta_tok.pth") if a == TATOK else a
                                     for a in tok_args], "--summary-json", str(tmp_path / "tok-local.json")))
        assert _summary(tmp_path / "tok-local.json")["shards_skipped"] == 2
        _ok(jobs("caption", *cap_args, "--output", str(cap), "--summary-json", str(tmp_path / "cap.json")))
        assert _summary(tmp_path / "cap.json")["samples_ok"] == 8

        got = _model_downloads(hub)
        assert got[("csuhan/TA-Tok", "ta_tok.pth")] == 1 and got[("tarflow-test/Tar-tiny", "model.safetensors")] == 1
        assert all(n == 1 for n in got.values()), json.dumps(sorted(map(str, got.items())))
        assert not [k for k in hub.downloads if k[0] == "dataset"]  # the shards: by ranges only
        assert hub.range_reads[("dataset", "tarflow-test/sample-shards", "shards/00000.tar")] >= 1

        # the repo moves on: a rerun is another checkpoint (refused); pinned to the first commit, it resumes
        hub.add_commit("csuhan/TA-Tok", {"ta_tok.pth": ta_tok + b"\0" * 64})
        r = jobs("tokenize_laion", *tok_args)
        assert r["rc"] == 2 and "--overwrite" in r["stderr"], r["stderr"][-2000:]
        pinned = f"hf://csuhan/TA-Tok@{commit}/ta_tok.pth"
        _ok(jobs("tokenize_laion", *[pinned if a == TATOK else a for a in tok_args],
                 "--summary-json", str(tmp_path / "tok-pinned.json")))
        assert _summary(tmp_path / "tok-pinned.json")["shards_skipped"] == 2
        assert _model_downloads(hub) == got  # nothing downloaded again
    finally:
        jobs.close()
        hub.add_commit("csuhan/TA-Tok", {"ta_tok.pth": ta_tok})  # back as it was, for the other tests

    # offline: the same cache serves alone (no request at all); facts computed offline equal the online ones
    hub.reset_counts()
    jobs = JobRunner(hub_env(hub, tmp_path / "hf", offline=True), tmp_path / "runner-offline.log")
    try:
        _ok(jobs("caption", *cap_args, "--output", str(cap), "--summary-json", str(tmp_path / "cap-again.json")))
        assert _summary(tmp_path / "cap-again.json")["shards_skipped"] == 2
        _ok(jobs("caption", *cap_args, "--output", str(tmp_path / "cap-offline"),
                 "--summary-json", str(tmp_path / "cap-offline.json")))
        assert _summary(tmp_path / "cap-offline.json")["samples_ok"] == 8
    finally:
        jobs.close()
    assert hub.requests == []
    for shard in ("00000", "00001"):
        online = pq.read_table(cap / "captions" / f"{shard}.parquet").column("caption").to_pylist()
        assert pq.read_table(tmp_path / "cap-offline" / "captions" / f"{shard}.parquet").column(
            "caption").to_pylist() == online


@pytest.mark.cluster
def test_generate_and_a_trainer_take_models_from_the_hub_once_per_node(hub_with_tar, tmp_path):
    """generate (prompts from a dataset repo; MLLM folder, TA-Tok, AR de-tokenizer and VQ from model repos) and the
    AR de-tokenizer trainer (--tatok, --init) on one node, on one fresh cache: each model file downloaded once."""
    hub = hub_with_tar
    hub.reset_counts()
    tok, gen = tmp_path / "tok", tmp_path / "gen"
    jobs = JobRunner(hub_env(hub, tmp_path / "hf"), tmp_path / "runner.log")
    try:
        _ok(jobs("tokenize_laion", "--input", SHARDS, "--output", str(tok), "--tatok", TATOK, "--vq", VQ,
                 "--vq-resolution", "64", "--scales", "1", "--encode-batch-size", "4", "--no-progress"))
        vq_commit = hub.repos[("model", "peizesun/llamagen_t2i")].refs["main"]
        assert f"hf://peizesun/llamagen_t2i@{vq_commit}/vq_ds16_t2i.pt" in (tok / "_manifest" / "00000.json").read_text()
        _ok(jobs("generate", "--prompts", PROMPTS, "--mllm", TAR, "--tatok", TATOK, "--ar-detok", AR, "--vq", VQ,
                 "--output", str(gen), "--samples-per-shard", "3", "--no-progress",
                 "--summary-json", str(tmp_path / "gen.json")))
        assert _summary(tmp_path / "gen.json")["samples_ok"] == 3
        _ok(jobs("train_ar_detok", "--data", str(tok), "--tatok", TATOK, "--init", AR, "--scale", "1",
                 "--steps", "2", "--batch-size", "4", "--log-every", "1", "--checkpoint-every", "2",
                 "--num-workers", "1", "--cpus-per-worker", "0.5", "--storage-path", str(tmp_path / "runs"),
                 "--name", "hub", "--output", str(tmp_path / "ar.pth")))
        assert (tmp_path / "ar.pth").stat().st_size > 0
    finally:
        jobs.close()
    got = _model_downloads(hub)
    for key in [("csuhan/TA-Tok", "ta_tok.pth"), ("csuhan/TA-Tok", "ar_dtok_lp_256px.pth"),
                ("peizesun/llamagen_t2i", "vq_ds16_t2i.pt"), ("tarflow-test/Tar-tiny", "model.safetensors")]:
        assert got.get(key) == 1, (key, got)
    assert all(n == 1 for n in got.values()), json.dumps(sorted(map(str, got.items())))


@pytest.mark.parametrize("url, want", [
    ("hf://csuhan/TA-Tok/ta_tok.pth", ("model", "csuhan/TA-Tok", None, "ta_tok.pth")),
    ("hf://csuhan/Tar-1.5B", ("model", "csuhan/Tar-1.5B", None, "")),
    ("hf://csuhan/TA-Tok@v1.0/sub/x.pt", ("model", "csuhan/TA-Tok", "v1.0", "sub/x.pt")),
    ("hf://datasets/lmms-lab/LLaVA-ReCap-558K@refs%2Fpr%2F3/data/*.parquet",
     ("dataset", "lmms-lab/LLaVA-ReCap-558K", "refs/pr/3", "data/*.parquet")),
])
def test_hub_path_parsing_round_trips(url, want):
    from tarflow.data import hub

    hp = hub.parse(url)
    assert (hp.repo_type, hp.repo_id, hp.revision, hp.path) == want
    assert hub.parse(hp.url()) == hp


def test_a_path_that_is_no_repo_is_refused():
    from tarflow.data import hub

    with pytest.raises(hub.HubError, match="hf://OWNER/REPO"):
        hub.parse("hf://ta_tok.pth")
