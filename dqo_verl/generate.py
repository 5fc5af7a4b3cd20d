"""Sampling with transformers `generate`: the backend for machines without vLLM.

Returns, per sample, the prompt and response token ids (the response ends with eos when the
model stopped), the decoded text and the finish reason (`stop` / `length`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer


@dataclass
class SamplingConfig:
    """The paper's corpus sampling parameters (temperature 0.9, top_p 0.9, top_k 16, min_p 0.01)."""

    n: int = 20
    temperature: float = 0.9
    top_p: float = 0.9
    top_k: int = 16
    min_p: float = 0.01
    max_new_tokens: int = 512
    seed: int = 0
    batch_size: int = 64


def sample_hf(model_path: str, prompt_ids: list[list[int]], cfg: SamplingConfig, desc: str = "sampling") -> list[dict]:
    """cfg.n samples per prompt, prompt-major order; temperature 0 means greedy (then n must be 1)."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32).eval()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    greedy = cfg.temperature == 0
    if greedy and cfg.n != 1:
        raise ValueError("greedy decoding gives one sample per prompt: set n=1")
    out: list[dict] = []
    per_call = max(1, cfg.batch_size // cfg.n)
    with tqdm(total=len(prompt_ids), desc=desc, unit="prompt", dynamic_ncols=True) as bar:
        for start in range(0, len(prompt_ids), per_call):
            chunk = prompt_ids[start : start + per_call]
            width = max(map(len, chunk))
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attention = torch.zeros_like(input_ids)
            for i, ids in enumerate(chunk):
                input_ids[i, width - len(ids) :] = torch.as_tensor(ids)
                attention[i, width - len(ids) :] = 1
            torch.manual_seed(cfg.seed + start)
            sample_kwargs = (
                {"do_sample": False}
                if greedy
                else dict(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, min_p=cfg.min_p)
            )
            with torch.no_grad():
                seqs = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention,
                    max_new_tokens=cfg.max_new_tokens,
                    num_return_sequences=cfg.n,
                    eos_token_id=eos,
                    pad_token_id=pad,
                    **sample_kwargs,
                )
            for row, seq in enumerate(seqs[:, width:].tolist()):
                stop = seq.index(eos) + 1 if eos in seq else None
                response = seq[:stop] if stop else seq
                out.append(
                    {
                        "prompt_ids": list(chunk[row // cfg.n]),
                        "response_ids": response,
                        "response": tokenizer.decode(response, skip_special_tokens=True),
                        "finish_reason": "stop" if stop else "length",
                    }
                )
            bar.update(len(chunk))
    return out
