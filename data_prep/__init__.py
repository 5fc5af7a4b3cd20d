"""Data stages driven by Make: prompts -> corpus -> score -> baselines / process (see README)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from omegaconf import DictConfig


def require(path: Path, stage: Callable[[DictConfig], object], cfg: DictConfig) -> Path:
    """`path`, made first by `stage(cfg)` when it is missing (finished stages are reused)."""
    if not path.exists():
        print(f"[{stage.__module__.rsplit('.', 1)[-1]}] {path} is missing: running that stage first")
        stage(cfg)
    return path
