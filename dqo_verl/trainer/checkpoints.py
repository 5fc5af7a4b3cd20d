"""The checkpoint folder: global_step_N/ written under a temporary name, renamed, then the tracker.

A checkpoint is only ever picked up through `latest_checkpointed_iteration.txt` (verl's tracker
file), which is replaced atomically after the folder is complete; a save killed halfway leaves
a `.global_step_N.tmp` folder that nothing reads and the next run removes.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from verl.utils.checkpoint.checkpoint_manager import get_checkpoint_tracker_filename

COMPLETE_MARKER = "trainer_state.json"  # written last inside a checkpoint folder


class CheckpointDir:
    """`root/global_step_N` folders plus verl's tracker file."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.tracker = Path(get_checkpoint_tracker_filename(str(self.root)))

    def path(self, step: int) -> Path:
        return self.root / f"global_step_{step}"

    def latest(self) -> Path | None:
        """The checkpoint the tracker names, None before the first; leftovers of killed saves are removed."""
        for stale in self.root.glob(".global_step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        if not self.tracker.exists():
            return None
        path = self.path(int(self.tracker.read_text().strip()))
        if not (path / COMPLETE_MARKER).exists():
            raise FileNotFoundError(f"{self.tracker} names {path.name}, which is missing or incomplete")
        return path

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """`write(folder)` fills a temporary folder (ending with COMPLETE_MARKER); then rename, then tracker."""
        self.root.mkdir(parents=True, exist_ok=True)
        final, tmp = self.path(step), self.root / f".global_step_{step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        write(tmp)
        if not (tmp / COMPLETE_MARKER).exists():
            raise RuntimeError(f"checkpoint writer left no {COMPLETE_MARKER} in {tmp}")
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        tracker_tmp = self.tracker.with_name(self.tracker.name + ".tmp")
        tracker_tmp.write_text(str(step))
        os.replace(tracker_tmp, self.tracker)
        return final

    def prune(self, keep: int | None) -> list[Path]:
        """Delete all but the newest `keep` checkpoints (never the tracked one); returns what was deleted."""
        if not keep or keep <= 0:
            return []
        tracked = self.latest()
        steps = sorted(
            (int(p.name.rsplit("_", 1)[1]), p)
            for p in self.root.glob("global_step_*")
            if p.name.rsplit("_", 1)[1].isdigit()
        )
        removed = [p for _, p in steps[:-keep] if p != tracked]
        for p in removed:
            shutil.rmtree(p, ignore_errors=True)
        return removed


def epoch_checkpoints(root: str | os.PathLike) -> dict[int, Path]:
    """{epoch: global_step_N folder} of the complete checkpoints that end an epoch, in epoch order."""
    out = {}
    for folder in Path(root).glob("global_step_*"):
        marker = folder / COMPLETE_MARKER
        if not marker.exists():
            continue
        state = json.loads(marker.read_text())
        epoch, rest = divmod(state["global_step"], state["steps_per_epoch"])
        if rest == 0 and epoch > 0:
            out[epoch] = folder
    return dict(sorted(out.items()))
