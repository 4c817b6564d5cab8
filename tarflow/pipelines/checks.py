"""The bulk jobs' checks on the driver, before Ray starts or a model loads (see tarflow/preflight.py).

Each `check_*` adds every problem it finds to a `Problems` and returns what it learnt (so one bad path does not
hide the next); the jobs call `tokenize_problems`, `caption_problems` or `generate_problems` and raise once.
They look at files, not models: existence, readability, a checkpoint's container (a torch.save zip, complete),
a model folder's files, an input's format, whether the output can be written, and the shards' scales.
"""
from __future__ import annotations

import json
import os
import zipfile

from tarflow.data import schema, storage
from tarflow.data.model_folder import check_model_folder
from tarflow.preflight import Problems

ZIP_MAGIC = b"PK\x03\x04"
MIN_CHECKPOINT_BYTES = 1024  # an empty torch.save() is ~1 KB: anything smaller is a stub or an error page


def under_ray_job_submit() -> bool:
    """True in the driver of a `ray job submit` job: it runs in Ray's temporary copy of the working dir, not in
    the directory the user submitted from."""
    return bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")) or "_ray_pkg_" in os.getcwd()


def check_output(p: Problems, output: str, flag: str = "--output") -> None:
    """A relative path under `ray job submit` (it would land in Ray's temporary copy of the working dir, and
    vanish), an output that is a file, or a folder that cannot be written."""
    if not output:
        p.add(flag, "is empty", "give an output folder or s3:// prefix")
        return
    if storage.is_remote(output):
        return
    path = output.removeprefix("file://")
    if not os.path.isabs(os.path.expanduser(path)) and under_ray_job_submit():
        p.add(f"{flag} {output}",
              "is relative: under `ray job submit` it would land in Ray's temporary copy of the working dir and "
              "vanish", "give an absolute path, e.g. --output \"$PWD/" + os.path.normpath(path)
              + "\" in the submitting shell, or an s3:// prefix")
        return
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path) and not os.path.isdir(path):
        p.add(f"{flag} {output}", "is a file, not a folder", "give a folder (created if missing)")
        return
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        p.add(f"{flag} {output}", f"{existing} is a file, so the folder cannot be created", "give another path")
    elif not _can_create_in(existing):
        p.add(f"{flag} {output}", f"{existing} is not writable by this user (or is on a read-only file system)",
              "give a folder you can write to (or fix its permissions)")


def _can_create_in(folder: str) -> bool:
    """Try it (os.access says yes to root on a read-only mount, and no on some network file systems that would
    accept the write): create and remove a probe file."""
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(prefix=".tarflow-write-check-", dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def check_checkpoint(p: Problems, path: str | None, flag: str, what: str) -> bool:
    """A `torch.save` file: exists, readable, not tiny, a zip with its central directory (not truncated)."""
    if not path:
        return False
    where = f"{flag} {path}"
    try:
        fs, inner = storage.filesystem(path)
        if not fs.exists(inner):
            p.add(where, "not found", f"check the path ({what}); s3:// paths need AWS credentials")
            return False
        if fs.isdir(inner):
            p.add(where, f"is a folder; {flag} takes the {what} file")
            return False
        size = fs.size(inner)
        with fs.open(inner, "rb") as f:
            head = f.read(4)
            if size < MIN_CHECKPOINT_BYTES:
                p.add(where, f"is only {size} bytes", f"not a {what}; copy or download it again")
                return False
            if head != ZIP_MAGIC:
                p.add(where, f"is not a torch checkpoint (a torch.save zip file starts with PK, this with {head!r})",
                      f"give the {what}")
                return False
            if storage.is_remote(path):
                return True  # reading the whole file from object storage here would double its download
            try:
                names = zipfile.ZipFile(f).namelist()
            except zipfile.BadZipFile:
                p.add(where, "is truncated or damaged (its zip directory is missing)", "copy or download it again")
                return False
    except PermissionError:
        p.add(where, "is not readable by this user", "fix its permissions")
        return False
    except OSError as e:
        p.add(where, f"cannot be read ({type(e).__name__}: {e})")
        return False
    if not any(n.endswith("/data.pkl") for n in names):
        p.add(where, "is a zip file but not a torch checkpoint (no data.pkl)", f"give the {what}")
        return False
    return True


def check_vae_folder(p: Problems, path: str | None, flag: str, resolution: int | None = None,
                     resolution_flag: str = "--latent-resolution") -> dict | None:
    """A diffusers AutoencoderDC folder, or a SANA pipeline folder with one in vae/: its config (which names
    the class) and safetensors weights; `resolution` a multiple of its downsample factor. Returns its config."""
    from tarflow.models.diffusion_detok import VAE_CLASS, vae_config, vae_downsample, vae_folder

    if not path:
        return None
    try:
        folder = vae_folder(path)
        cfg = vae_config(folder)
        files = storage.list_sizes(folder)
    except FileNotFoundError as e:
        p.add(f"{flag} {path}", str(e).removeprefix(f"{path}: "))
        return None
    except OSError as e:
        p.add(f"{flag} {path}", f"cannot be read ({type(e).__name__}: {e})")
        return None
    if not any(f.endswith(".safetensors") for f in files):
        p.add(f"{flag} {folder}", "has no *.safetensors weights", f"save the {VAE_CLASS} with save_pretrained(folder)")
        return None
    f = vae_downsample(cfg)
    if resolution is not None and (resolution < f or resolution % f):
        p.add(f"{resolution_flag} {resolution}", f"is not a positive multiple of the VAE's downsample factor {f} "
              f"({folder})", f"give a multiple of {f}, e.g. {max(f, resolution // f * f)}")
    return cfg


def _looks_like_tokenize_output(path: str) -> bool:
    return storage.isdir(storage.join(path, schema.CODES_DIR))


def check_img2dataset_input(p: Problems, inputs: list[str], input_format: str) -> list:
    """The tokenize job's input: img2dataset shards; the tokenize job's own output is said to be the wrong one."""
    from tarflow.data.img2dataset import InputError, resolve_inputs

    for s in inputs:
        if not storage.is_remote(s) and os.path.isdir(s) and _looks_like_tokenize_output(s):
            p.add(f"--input {s}", "is a tokenize job's output (code shards), not img2dataset shards",
                  "give img2dataset's output folder (its .tar files)")
            return []
    try:
        shards = resolve_inputs(inputs, input_format)
    except InputError as e:
        p.add("--input", str(e))
        return []
    except PermissionError as e:
        p.add(f"--input {e.filename or inputs}", "is not readable by this user", "fix its permissions")
        return []
    # a few footers spread over the inputs, read at once, tell a folder of code shards (opening every footer
    # would cost a request per shard; a stray code shard among image shards fails alone when it is read)
    parquets = [s for s in shards if s.format in ("parquet", "conversations")]
    sample = parquets[:: max(1, len(parquets) // FOOTERS_CHECKED)][:FOOTERS_CHECKED]
    if sample:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(sample)) as pool:
            code = [s for s, is_code in zip(sample, pool.map(lambda s: _is_code_shard(s.path), sample)) if is_code]
        if code:
            p.add(f"--input {code[0].path}", "is a tarflow code shard, not img2dataset output or a conversation "
                  "table", "give img2dataset's output (.tar, or .parquet with image bytes) or a conversation table")
            return []
    first = next((s for s in shards if s.format == "parquet"), None)
    if first is not None:
        try:
            names = _parquet_schema(first.path).names
        except Exception as e:  # noqa: BLE001 - not Parquet at all
            p.add(f"--input {first.path}", f"cannot be read as Parquet ({type(e).__name__}: {str(e)[:120]})",
                  "give img2dataset shards or conversation tables")
            return []
        from tarflow.data.images import IMAGE_SUFFIXES

        if not any(c in names for c in IMAGE_SUFFIXES):
            p.add(f"--input {first.path}", f"is neither img2dataset's parquet output (no image bytes column jpg/png/"
                  f"webp...) nor a conversation table (no `conversations` column); its columns: {names[:8]}",
                  "give img2dataset shards, or a table with LLaVA-style `conversations` (and `image`)")
    return shards


def check_conversation_input(p: Problems, shards: list, image_root: str | None, vq: str | None = None,
                             latents: str | None = None) -> None:
    """Conversation tables: no --vq / --latents; the first file's columns; --image-root present when given, and
    given when the first rows of the first file name images by relative paths."""
    from tarflow.data.conversations import file_kind, peek_image_paths
    from tarflow.data.img2dataset import InputError
    from tarflow.data.retrying_file import ShardReadError

    for flag, value in (("--vq", vq), ("--latents", latents)):
        if value:
            p.add(f"{flag} {value}", "is for image-text pairs (the de-tokenizers' training data), not conversation "
                  "tables", f"drop {flag}, or tokenize img2dataset shards into another --output")
    if image_root:
        try:
            if not storage.isdir(image_root):
                p.add(f"--image-root {image_root}", "is not a folder (or does not exist)",
                      "give the folder the rows' image paths are relative to (local or s3://)")
        except OSError as e:
            p.add(f"--image-root {image_root}", f"cannot be read ({type(e).__name__}: {e})")
    for kind in ("parquet", "json"):
        first = next((s for s in shards if file_kind(s.path) == kind), None)
        if first is None:
            continue
        try:
            relative = [x for x in peek_image_paths(first.path) if not (storage.is_remote(x) or os.path.isabs(x))]
        except (InputError, ShardReadError) as e:
            p.add(f"--input {first.path}", str(e).replace(f"{first.path}: ", "").replace(f"shard {first.path} ", ""),
                  "give a conversation table (LLaVA-style `conversations`, `image`)")
            continue
        if relative and not image_root:
            p.add(f"--input {first.path}", f"its rows name images by relative paths (e.g. {relative[0]!r})",
                  "pass --image-root FOLDER, the folder they are relative to (local or s3://)")


FOOTERS_CHECKED = 8


def _parquet_schema(path: str):
    import pyarrow.parquet as pq

    fs, inner = storage.filesystem(path)
    with fs.open(inner, "rb") as f:
        return pq.read_schema(f)


def _is_code_shard(path: str) -> bool:
    try:
        raw = (_parquet_schema(path).metadata or {}).get(schema.PARQUET_META_KEY)
        return raw is not None and json.loads(raw).get("format") in (schema.CODE_SHARD_FORMAT,
                                                                     schema.CONVERSATION_SHARD_FORMAT)
    except Exception:
        return False


def check_code_shard_input(p: Problems, inputs: list[str], scale: int | None = None, flag: str = "--input") -> list:
    """The tokenize job's output (or code shards): present, in the code shard format, with the asked scale."""
    from tarflow.data.codeshard import resolve_code_shards

    fix = "give the tokenize job's output folder (it holds codes/ and _manifest/)"
    for s in inputs:
        if storage.isdir(s) and not _looks_like_tokenize_output(s):
            names = storage.listdir(s)
            if any(n.endswith(".tar") for n in names):
                p.add(f"{flag} {s}", "holds img2dataset shards (.tar), not code shards", fix)
                return []
    try:
        shards = resolve_code_shards(inputs)
    except (FileNotFoundError, ValueError) as e:
        p.add(flag, str(e))
        return []
    first = shards[0].path
    try:
        meta = schema.check_any_code_shard(_parquet_schema(first), first)
    except schema.SchemaError as e:
        p.add(f"{flag} {first}", str(e).removeprefix(f"{first}: "), fix)
        return []
    except Exception as e:  # not Parquet at all
        p.add(f"{flag} {first}", f"is not a code shard ({type(e).__name__})", fix)
        return []
    scales = sorted(meta.get("scales", []))
    if scale is not None and scale not in scales:
        p.add(f"--scale {scale}", f"the code shards in {inputs[0]} hold scales {scales}",
              f"pass --scale {scales[0]}" if scales else "tokenize at this scale")
    return shards


def check_prompt_table(p: Problems, path: str) -> bool:
    if not path:
        return False
    if not path.endswith((".parquet", ".csv", ".jsonl", ".json")):
        p.add(f"--prompts {path}", "is not a .parquet, .csv or .jsonl file", "give a prompt table (id, prompt, ...)")
        return False
    try:
        if not storage.exists(path):
            p.add(f"--prompts {path}", "not found", "check the path")
            return False
        if storage.isdir(path):
            p.add(f"--prompts {path}", "is a folder", "give one prompt table file")
            return False
        if not storage.is_remote(path) and not os.access(path, os.R_OK):
            p.add(f"--prompts {path}", "is not readable by this user", "fix its permissions")
            return False
    except OSError as e:
        p.add(f"--prompts {path}", f"cannot be read ({type(e).__name__}: {e})")
        return False
    return True


# ----------------------------------------------------------------------------------------------------------
# Per job


def tokenize_problems(cfg, found: dict | None = None) -> Problems:
    """`found["inputs"]`: the input shards resolved here, for the job to use (inputs are resolved once)."""
    p = Problems()
    shards = check_img2dataset_input(p, list(cfg.input), cfg.input_format)
    conversations = [s for s in shards if s.format == "conversations"]
    if conversations:
        check_conversation_input(p, conversations, getattr(cfg, "image_root", None), cfg.vq, cfg.latents)
    if len(conversations) not in (0, len(shards)):
        p.add("--input", "mixes conversation tables and img2dataset shards", "tokenize each kind into its own --output")
    if found is not None:
        found["inputs"] = shards
    check_checkpoint(p, cfg.tatok, "--tatok", "TA-Tok checkpoint (ta_tok.pth)")
    if cfg.vq and not conversations:
        check_checkpoint(p, cfg.vq, "--vq", "pixel VQ checkpoint (vq_ds16_t2i.pt)")
    if cfg.latents and not conversations:
        check_vae_folder(p, cfg.latents, "--latents", cfg.latent_resolution)
    check_output(p, cfg.output)
    return p


def caption_problems(cfg, found: dict | None = None) -> Problems:
    """`found["inputs"]`: the code shards resolved here, for the job to use (inputs are resolved once)."""
    p = Problems()
    shards = check_code_shard_input(p, list(cfg.input), cfg.scale)
    if found is not None:
        found["inputs"] = shards
    check_model_folder(p, cfg.model, "--model")
    check_output(p, cfg.output)
    return p


def generate_problems(cfg) -> Problems:
    p = Problems()
    check_prompt_table(p, cfg.prompts)
    check_model_folder(p, cfg.mllm, "--mllm")
    check_checkpoint(p, cfg.tatok, "--tatok", "TA-Tok checkpoint (ta_tok.pth)")
    if cfg.detok == "ar":
        check_checkpoint(p, cfg.ar_detok, "--ar-detok", "AR de-tokenizer checkpoint (ar_dtok_*.pth)")
        check_checkpoint(p, cfg.vq, "--vq", "pixel VQ checkpoint (vq_ds16_t2i.pt)")
    elif cfg.diffusion_detok and not storage.exists(cfg.diffusion_detok):
        p.add(f"--diffusion-detok {cfg.diffusion_detok}", "not found", "give the SANA de-tokenizer folder (diffusers)")
    check_output(p, cfg.output)
    return p
