"""The shared helpers that replaced hand-written copies: storage's copies, reads, removals and cached hash, the one
device/dtype rule and the one model-folder check. Quick: no Ray, no model."""
from __future__ import annotations

import builtins
import hashlib
import os

import pytest
import torch

from tarflow.data import storage

MiB = 1 << 20


def _record_reads(m, path: str) -> list[int]:
    """Every read of `path`'s bytes in this process, by size: through open() (fsspec's local files, shutil,
    s3fs's uploads) and through fsspec's buffered files (S3 reads)."""
    import fsspec.spec

    sizes: list[int] = []
    target, real_open = os.path.realpath(path), builtins.open
    real_read = fsspec.spec.AbstractBufferedFile.read

    class Reading:
        def __init__(self, f):
            self._f = f

        def read(self, n=-1):
            data = self._f.read(n)
            sizes.append(len(data))
            return data

        def readinto(self, b):
            n = self._f.readinto(b)
            sizes.append(n or 0)
            return n

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self._f, name)

    def recording_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        if isinstance(file, (str, os.PathLike)) and "r" in mode and os.path.realpath(file) == target:
            return Reading(f)
        return f

    def buffered_read(self, length=-1):
        data = real_read(self, length)
        sizes.append(len(data))
        return data

    m.setattr(builtins, "open", recording_open)
    m.setattr(fsspec.spec.AbstractBufferedFile, "read", buffered_read)
    return sizes


def test_checkpoint_copies_stream_in_parts_never_the_whole_file(tmp_path, s3_bucket, monkeypatch):
    """A file of 12 MiB, parts of 5 MiB (S3's smallest multipart part): local and S3 at either end, and the TA-Tok
    trainer's export. A copy that read the file whole (as storage.read_bytes did) records a 12 MiB read."""
    import s3fs

    from tarflow.train.tatok import MODEL_FILE, ModelPlan, export

    monkeypatch.setattr(storage, "COPY_CHUNK", 5 * MiB)
    data = os.urandom(12 * MiB)
    src = tmp_path / "ckpt" / MODEL_FILE
    src.parent.mkdir()
    src.write_bytes(data)
    s3 = s3fs.S3FileSystem()
    s3.put_file(str(src), f"{s3_bucket}/ckpt/{MODEL_FILE}")
    cases = [(str(src), str(tmp_path / "out" / "local.pth")),
             (str(src), f"{s3_bucket}/out/from-local.pth"),
             (f"{s3_bucket}/ckpt/{MODEL_FILE}", str(tmp_path / "out" / "from-s3.pth")),
             (f"{s3_bucket}/ckpt/{MODEL_FILE}", f"{s3_bucket}/out/from-s3.pth")]
    for a, b in cases:
        with monkeypatch.context() as m:
            sizes = _record_reads(m, a)
            storage.copy_file(a, b)
        assert max(sizes, default=0) <= 5 * MiB, (a, b, sizes)
        assert storage.read_bytes(b) == data, (a, b)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporary left
    plan = ModelPlan(input_size=126, grid=9, hidden=36, codebook_size=512, dim=32, teacher_name="t",
                     teacher_config=None, source={}, weights={}, temperature=None)
    with monkeypatch.context() as m:
        sizes = _record_reads(m, str(src))
        export(str(src.parent), f"{s3_bucket}/final/{MODEL_FILE}", plan)
    assert sizes and max(sizes) <= 5 * MiB, sizes
    assert s3.cat_file(f"{s3_bucket}/final/{MODEL_FILE}") == data


def test_a_failed_copy_leaves_no_file_and_no_temporary(tmp_path, monkeypatch):
    import shutil

    src, dst = tmp_path / "a.pth", tmp_path / "out" / "a.pth"
    src.write_bytes(b"x" * 1000)

    def half_then_fail(a, b):
        with open(b, "wb") as f:
            f.write(b"x" * 500)
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copyfile", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        storage.copy_file(str(src), str(dst))
    assert os.listdir(dst.parent) == []


def test_sha256_is_remembered_per_path_size_and_mtime(tmp_path, monkeypatch):
    import fsspec.implementations.local as local

    f, cache = tmp_path / "ta_tok.pth", tmp_path / "cache"
    f.write_bytes(b"a" * 100_000)
    assert storage.sha256(str(f), cache) == hashlib.sha256(b"a" * 100_000).hexdigest()
    with monkeypatch.context() as m:
        m.setattr(local.LocalFileSystem, "_open", lambda *a, **k: pytest.fail("hashed again"))
        assert storage.sha256(str(f), cache) == hashlib.sha256(b"a" * 100_000).hexdigest()
    f.write_bytes(b"b" * 100_000)  # same size, another mtime: hashed again
    os.utime(f, ns=(os.stat(f).st_atime_ns, os.stat(f).st_mtime_ns + 10**9))
    assert storage.sha256(str(f), cache) == hashlib.sha256(b"b" * 100_000).hexdigest()


def test_read_many_and_remove_many_locally(tmp_path):
    for name in "bac":
        (tmp_path / name).write_bytes(name.encode() * 3)
    (tmp_path / "sub").mkdir()
    paths = [str(tmp_path / "b"), str(tmp_path / "missing"), str(tmp_path / "a"), f"file://{tmp_path / 'c'}"]
    got = storage.read_many(paths)
    assert list(got) == paths and list(got.values()) == [b"bbb", None, b"aaa", b"ccc"]
    with pytest.raises(IsADirectoryError):
        storage.read_many([str(tmp_path / "sub")])
    storage.remove_many([str(tmp_path / "a"), str(tmp_path / "missing"), str(tmp_path / "b")])
    assert sorted(os.listdir(tmp_path)) == ["c", "sub"]


def test_one_device_and_dtype_rule(monkeypatch):
    from tarflow.models.device import resolve_device_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device_dtype() == (torch.device("cpu"), torch.float32)
    assert resolve_device_dtype(None, None) == (torch.device("cpu"), torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device_dtype("auto", "auto") == (torch.device("cuda"), torch.bfloat16)
    assert resolve_device_dtype("cuda:1") == (torch.device("cuda:1"), torch.bfloat16)
    assert resolve_device_dtype("cpu", "auto") == (torch.device("cpu"), torch.float32)
    assert resolve_device_dtype("cuda", "float32") == (torch.device("cuda"), torch.float32)
    assert resolve_device_dtype("cpu", torch.float16) == (torch.device("cpu"), torch.float16)


def test_one_model_folder_check_local_and_on_s3(tmp_path, s3_bucket):
    import s3fs

    from tarflow.data.model_folder import check_model_folder
    from tarflow.preflight import Problems

    def lines(path, **kw):
        p = Problems()
        ok = check_model_folder(p, path, "--model", **kw)
        assert ok == (not p.lines)
        return p.lines

    good = tmp_path / "good"
    good.mkdir()
    for name, body in (("config.json", "{}"), ("model.safetensors", "w"), ("tokenizer.json", "{}")):
        (good / name).write_text(body)
    assert lines(str(good)) == []
    none = Problems()
    assert check_model_folder(none, None, "--model") is False and not none.lines  # not given: nothing to check
    assert lines(str(tmp_path / "nowhere"))[0].startswith(f"--model {tmp_path / 'nowhere'}: not found; ")
    assert lines(str(good / "config.json"))[0].startswith(f"--model {good / 'config.json'}: is a file, not a folder")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "pytorch_model.bin").write_bytes(b"x")
    assert lines(str(bare)) == [f"--model {bare}: not a Hugging Face model folder: no config.json, *.safetensors "
                                "weights (it has pickled *.bin weights, which tarflow does not load), tokenizer files; "
                                "save the model with save_pretrained(folder, safe_serialization=True) and its "
                                "tokenizer beside"]
    (good / "config.json").write_text("{not json")
    assert lines(str(good)) == [f"--model {good}/config.json: does not parse (JSONDecodeError); copy it again"]
    (good / "config.json").write_text("{}")
    (good / "tokenizer.json").unlink()
    assert lines(str(good), tokenizer=False) == []
    s3fs.S3FileSystem().put(str(good), f"{s3_bucket}/model", recursive=True)
    assert lines(f"{s3_bucket}/model") == [f"--model {s3_bucket}/model: not a Hugging Face model folder: no tokenizer "
                                           "files; save the model with save_pretrained(folder, "
                                           "safe_serialization=True) and its tokenizer beside"]
    assert lines(f"{s3_bucket}/nothing")[0].startswith(f"--model {s3_bucket}/nothing: not found")
