"""The embedded default's tiny model, built offline and deterministically by seed (`save_pretrained`):

- a character-level tokenizer (byte-level BPE without merges: every ASCII character, newline
  included, is one token) with a ChatML chat template;
- a Qwen2-architecture causal LM (head_dim >= 32, which vLLM's CPU attention needs).

Its value model is built like any other's, by `models.build_value_model`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

PAD, BOS_CHAT, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

SPECIAL_TOKENS = [PAD, BOS_CHAT, EOS]

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer in Qwen2's own format: byte-level BPE with no merges.

    Every byte is one token (every ASCII character, "\\n" included), so text round-trips exactly and
    `AutoTokenizer` (which maps model_type qwen2 to `Qwen2Tokenizer`) tokenizes it the same way.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=PAD, padding_side="left"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_qwen2_config(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 384,
    max_position_embeddings: int = 1024,
) -> Qwen2Config:
    """Qwen2 config sized for a CPU; head_dim = hidden_size / num_heads must be >= 32."""
    if hidden_size // num_heads < 32:
        raise ValueError(f"head_dim {hidden_size // num_heads} < 32: vLLM's CPU attention needs >= 32")
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS_CHAT),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        architectures=["Qwen2ForCausalLM"],
        torch_dtype="float32",
    )


def build_tiny_policy(out_dir: str | os.PathLike, seed: int = 0, **config_kwargs) -> Path:
    """Random-init tiny Qwen2 causal LM + char tokenizer, saved to `out_dir`; same seed, same weights."""
    out = Path(out_dir)
    tokenizer = build_char_tokenizer()
    config = tiny_qwen2_config(tokenizer, **config_kwargs)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=True
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
