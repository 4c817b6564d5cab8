"""A Hugging Face model folder as the bulk jobs and the MLLM trainer take it (--model, --mllm, --base), checked on
the driver before Ray starts: local or remote (s3://, hf://) alike, every missing file in one line."""
from __future__ import annotations

import json
import os

from tarflow.data import storage
from tarflow.preflight import Problems

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def check_model_folder(p: Problems, path: str | None, flag: str, what: str = "Tar checkpoint folder",
                       tokenizer: bool = True) -> bool:
    """A Hugging Face model folder, local or remote (s3://, hf://): a readable folder holding config.json (that
    parses), *.safetensors weights and, with `tokenizer`, tokenizer files. What it lacks is one line."""
    if not path:
        return False
    where, remote = f"{flag} {path}", storage.is_remote(path)
    try:
        if not storage.exists(path):
            return p.check(False, where, "not found", f"give the {what} (config.json, *.safetensors, tokenizer "
                           "files)" + ("; s3:// needs AWS credentials" if remote else ""))
        if not storage.isdir(path):
            return p.check(False, where, "is a file, not a folder",
                           f"give the {what} (config.json, *.safetensors, tokenizer files)")
        if not remote and not os.access(path.removeprefix("file://"), os.R_OK | os.X_OK):
            return p.check(False, where, "is not readable by this user", "fix its permissions")
        names = {f.rstrip("/").rsplit("/", 1)[-1] for f in storage.listdir(path)}
    except OSError as e:
        return p.check(False, where, f"cannot be read ({type(e).__name__}: {e})")
    pickled = " (it has pickled *.bin weights, which tarflow does not load)" if any(
        n.endswith(".bin") for n in names) else ""
    missing = [item for item, ok in (("config.json", "config.json" in names),
                                     ("*.safetensors weights" + pickled, any(n.endswith(".safetensors") for n in names)),
                                     ("tokenizer files", not tokenizer or bool(names & set(TOKENIZER_FILES))))
               if not ok]
    ok = p.check(not missing, where, f"not a Hugging Face model folder: no {', '.join(missing)}",
                 "save the model with save_pretrained(folder, safe_serialization=True) and its tokenizer beside")
    if "config.json" in names:
        try:
            json.loads(storage.read_bytes(storage.join(path, "config.json")))
        except (OSError, ValueError) as e:
            ok = p.check(False, f"{where}/config.json", f"does not parse ({type(e).__name__})", "copy it again")
    return ok
