"""Tiny random models and a byte-level tokenizer, built in-process for tests and offline demos.

Nothing here touches the network: the tokenizer is a fixed byte-level vocabulary (every string encodes),
and the model is a randomly initialized transformers architecture with a few layers.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

SPECIAL_TOKENS = ["<pad>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]

# Same template shape as SmolLM2's so prompts look alike on tiny and real models.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A 260-token byte-level tokenizer: 256 bytes + pad, im_start, im_end, eos. Left padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    for ch in sorted(byte_chars):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token=None,
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _llama(vocab: int, **ids: int | None) -> LlamaConfig:
    return LlamaConfig(
        **ids, vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    )


def _gpt2(vocab: int, **ids: int | None) -> GPT2Config:
    return GPT2Config(**ids, vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=512)


def _qwen2(vocab: int, **ids: int | None) -> Qwen2Config:
    return Qwen2Config(
        **ids, vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    )


TINY_CONFIGS = {"tiny-random-llama": _llama, "tiny-random-gpt2": _gpt2, "tiny-random-qwen2": _qwen2}


def tiny_model(name: str, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Build `name` (a key of TINY_CONFIGS) with weights drawn from a fixed seed, and its tokenizer."""
    tokenizer = byte_tokenizer()
    config = TINY_CONFIGS[name](
        len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None
    )
    # A private generator keeps the global RNG stream untouched, so building a model never shifts a run's sampling.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer
