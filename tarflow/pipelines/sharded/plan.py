"""Planning a run: which shards are done (their manifests, read concurrently after one listing), which to
do or redo, and which conflict with this run's facts (OutputConflict unless --overwrite). The layout,
manifests and facts themselves are data code (tarflow.data.shards)."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from tarflow.data import schema, storage
from tarflow.data.shards import ShardLayout, facts_mismatch


class OutputConflict(RuntimeError):
    pass


@dataclass
class Plan:
    todo: list[str]
    done: list[str]
    seconds: float = 0.0
    manifests_read: int = 0


def plan_shards(layout: ShardLayout, names: Iterable[str], facts: Mapping[str, Any],
                same_input: Callable[[str, Mapping], bool], overwrite: bool) -> Plan:
    """Split shard names into to-do and done with one listing of `_manifest/` and concurrent reads of only
    the manifests that exist (no request per missing shard: 100,000 shards plan in seconds). Manifests are read
    a chunk at a time and only the decision is kept, so the driver's memory does not grow with them.

    A finished shard whose manifest was made with other facts is a conflict: refused unless `overwrite`.
    A finished shard whose input changed (`same_input` false) or whose manifest is damaged is redone.
    The manifests of shards to redo are removed first, so a stale manifest never describes new outputs.
    """
    t0 = time.time()
    names = list(names)
    listed = {os.path.basename(p) for p in storage.list_sizes(storage.join(layout.output, schema.MANIFEST_DIR))}
    existing = {layout.manifest_path(n): n for n in names if f"{n}.json" in listed}
    del listed
    finished = set()
    conflicts, n_conflicts, redo = [], 0, []
    for path, data in storage.iter_read_many(list(existing)):
        name = existing[path]
        manifest = layout.parse_manifest(data, path) if data is not None else None
        if manifest is None:
            if data is not None:
                redo.append(name)
            continue
        diffs = facts_mismatch(facts, manifest, layout.manifest_version)
        if diffs and not overwrite:
            n_conflicts += 1
            if len(conflicts) < 10:  # the message names 10; a million conflicts must not fill the driver
                conflicts.append(f"{name}: {'; '.join(diffs)}")
        elif diffs or not same_input(name, manifest):
            redo.append(name)
        else:
            finished.add(name)
    if conflicts:
        raise OutputConflict(
            f"{layout.output} already holds shards made with other settings; refusing to mix outputs:\n  "
            + "\n  ".join(conflicts) + (f"\n  ... and {n_conflicts - 10} more" if n_conflicts > 10 else "")
            + "\nUse another --output, or pass --overwrite to redo these shards with the new settings.")
    storage.remove_many([layout.manifest_path(name) for name in redo])
    todo = [n for n in names if n not in finished]
    return Plan(todo=todo, done=[n for n in names if n in finished], seconds=time.time() - t0,
                manifests_read=len(existing))
