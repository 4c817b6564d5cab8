"""Checks a job runs on the driver before Ray starts or a model loads: every problem at once, one line each.

    problems = Problems()
    problems.check(storage.exists(path), path, "does not exist", "give the folder the tokenize job wrote")
    problems.raise_if_any()          # UsageError: run_job prints each line and exits 2

A line names the path (or flag), what is wrong and the fix, and is cut to a readable length. Checks that jobs
and trainers share live here too (check_model_folder).
"""
from __future__ import annotations

import json
import os

MAX_LINE = 300
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class UsageError(ValueError):
    """Bad arguments, paths or settings, found before any work; `lines` holds one problem each."""

    def __init__(self, lines: list[str]):
        self.lines = [shorten(line) for line in lines]
        super().__init__("\n".join(self.lines))


def shorten(text: str, limit: int = MAX_LINE) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 5] + " [..]"


class Problems:
    def __init__(self):
        self.lines: list[str] = []

    def add(self, what: str, problem: str, fix: str = "") -> None:
        self.lines.append(f"{what}: {problem}" + (f"; {fix}" if fix else ""))

    def check(self, ok: bool, what: str, problem: str, fix: str = "") -> bool:
        if not ok:
            self.add(what, problem, fix)
        return ok

    def __bool__(self) -> bool:
        return bool(self.lines)

    def raise_if_any(self) -> None:
        if self.lines:
            raise UsageError(self.lines)


def check_model_folder(p: Problems, path: str | None, flag: str, what: str = "Tar checkpoint folder",
                       tokenizer: bool = True) -> bool:
    """A Hugging Face model folder, local or remote (s3://, hf://): a readable folder holding config.json (that
    parses), *.safetensors weights and, with `tokenizer`, tokenizer files. What it lacks is one line."""
    from tarflow.data import storage

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
