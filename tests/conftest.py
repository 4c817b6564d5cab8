"""Test-session protections and shared services.

Before anything else is imported: no traffic to non-loopback addresses (an audit-hook guard in this process
and, through PYTHONPATH, in every subprocess and Ray worker), Ray / Hugging Face / AWS SDK kept offline. Then,
lazily and once per session: one real S3 server (moto, 127.0.0.1, free port) and one local Ray.
"""
from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
_GUARD_DIR = TESTS / "netguard"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_NETGUARD_LOG = os.path.join(tempfile.mkdtemp(prefix="tarflow-netguard-"), "attempts.log")
_S3_PORT = _free_port()
os.environ.update({
    "TARFLOW_NETGUARD_LOG": _NETGUARD_LOG,
    "PYTHONPATH": os.pathsep.join([str(_GUARD_DIR), str(TESTS), str(REPO)]
                                  + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])),
    # plain-http traffic (Ray's dashboard asks cloud metadata services) goes to a dead loopback port
    "HTTP_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
    "NO_PROXY": "localhost,127.0.0.1,::1", "no_proxy": "localhost,127.0.0.1,::1",
    "RAY_USAGE_STATS_ENABLED": "0", "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_OFFLINE": "1",
    "AWS_EC2_METADATA_DISABLED": "true", "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled",
    # S3: the session's moto server; fake credentials so no SDK goes looking for real ones
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_S3_PORT}", "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
    "TARFLOW_HOME": os.path.join(tempfile.mkdtemp(prefix="tarflow-home-"), "home"),
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    # Ray Train's controller polls workers every 2 s and a worker's report waits for the poll: the tiny
    # training runs here are made of such waits
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
})
for p in (str(TESTS), str(_GUARD_DIR)):
    if p not in sys.path:
        sys.path.insert(0, p)
# this process started before PYTHONPATH was set: install the same guard here
import importlib.util as _ilu  # noqa: E402

_spec = _ilu.spec_from_file_location("_tarflow_test_netguard", _GUARD_DIR / "sitecustomize.py")
_spec.loader.exec_module(_ilu.module_from_spec(_spec))

import pytest  # noqa: E402

FIXTURES = Path(os.environ.get("TARFLOW_REFERENCE_FIXTURES", REPO.parent / "shared" / "fixtures" / "reference"))


def reference_fixture(name: str) -> Path:
    """Folder of a reference parity fixture; skip where ../shared is absent, except under CI where it must be."""
    d = FIXTURES / name
    if not d.is_dir():
        msg = f"reference fixture {d} not found (the parity tests read ../shared/fixtures/reference)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg + "; under CI it must be present", pytrace=False)
        pytest.skip(msg)
    return d


@pytest.fixture(scope="session")
def s3_endpoint():
    """One real S3 server (moto in server mode) on 127.0.0.1 for the whole session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_S3_PORT, verbose=False)
    server.start()
    yield os.environ["AWS_ENDPOINT_URL"]
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh, empty bucket per test: returns 's3://<name>'."""
    import boto3

    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=name)
    yield f"s3://{name}"
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def hub_standin(tmp_path_factory):
    """One local stand-in of the Hugging Face Hub (tests/hubstandin.py) on 127.0.0.1 for the session, serving:
    model repos csuhan/TA-Tok and peizesun/llamagen_t2i (the reference fixtures under the released file names: Tar's
    scripts take the pixel VQ from the latter), dataset repo tarflow-test/sample-shards (the bundled sample's img2dataset shards under
    shards/, and prompts.jsonl) and a gated model repo tarflow-test/gated; tests add repos of their own with
    `add_commit` / `add_folder`. Jobs reach it through HF_ENDPOINT in a
    subprocess (huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE when imported); see tests/test_hub.py."""
    import json

    from hubstandin import HubStandIn

    from tarflow.data.sample import ensure_sample_shards

    ta_tok = reference_fixture("ta_tok")
    hub = HubStandIn()
    hub.add_commit("csuhan/TA-Tok", {
        "ta_tok.pth": ta_tok / "ta_tok.pth", "siglip_tiny/config.json": ta_tok / "siglip_tiny" / "config.json",
        "ar_dtok_lp_256px.pth": reference_fixture("ar_dtok") / "ar_dtok.pth", "README.md": b"# TA-Tok (stand-in)\n"})
    hub.add_commit("peizesun/llamagen_t2i", {"vq_ds16_t2i.pt": reference_fixture("vqvae") / "vq.pt"})
    shards = Path(ensure_sample_shards())
    prompts = [{"id": f"p{i}", "prompt": p, "scale": 3, "seed": i}
               for i, p in enumerate(["A photo of a cat.", "A red cube.", "A dog on a beach."])]
    hub.add_commit("tarflow-test/sample-shards", {
        **{f"shards/{f.name}": f for f in sorted(shards.iterdir()) if f.is_file()},
        "prompts.jsonl": "".join(json.dumps(r) + "\n" for r in prompts).encode()}, repo_type="dataset")
    hub.add_commit("tarflow-test/gated", {"ta_tok.pth": ta_tok / "ta_tok.pth"}, gated=True)
    hub.start()
    yield hub
    hub.stop()


@pytest.fixture(scope="session")
def ray_local(s3_endpoint):
    """One local Ray for the session (after the S3 server so that workers inherit its address)."""
    import ray

    from tarflow.pipelines.runtime import start_local_ray

    start_local_ray(num_cpus=2, include_dashboard=False, object_store_memory=512 << 20, log_to_driver=False,
                    configure_logging=False)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


def pytest_sessionfinish(session, exitstatus):
    if os.path.exists(_NETGUARD_LOG) and os.path.getsize(_NETGUARD_LOG):
        with open(_NETGUARD_LOG) as f:
            lines = f.read().splitlines()
        sys.stderr.write("\nOutbound network attempts were made during the tests (blocked):\n"
                         + "\n".join(lines[-10:]) + "\n")
        session.exitstatus = 1


def pytest_configure(config):
    config.addinivalue_line("markers", "cluster: the heavier group: multi-node simulations, fault injection, long CPU rehearsals (minutes each); "
                                       "`make test-cluster` runs them, and .ci/run after `make test`")
