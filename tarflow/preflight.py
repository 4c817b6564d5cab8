"""Checks a job runs on the driver before Ray starts or a model loads: every problem at once, one line each.

    problems = Problems()
    problems.check(storage.exists(path), path, "does not exist", "give the folder the tokenize job wrote")
    problems.raise_if_any()          # UsageError: run_job prints each line and exits 2

A line names the path (or flag), what is wrong and the fix, and is cut to a readable length. The base floor:
it imports nothing of tarflow (the checks that read storage, e.g. tarflow.data.model_folder, use it).
"""
from __future__ import annotations

MAX_LINE = 300


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
