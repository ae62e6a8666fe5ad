"""Tiny models and tokenizers built in-process (no downloads): for tests, smoke runs and the study.

``char_tokenizer`` is a character-level fast tokenizer with a ChatML chat template, so prompts, masks and
EOS handling behave exactly as with a real chat model. ``tiny_llama`` is a randomly initialised Llama of
a few hundred thousand parameters.
"""

from __future__ import annotations

import string

import torch

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIAL_TOKENS = ["<unk>", "<|im_start|>", "<|im_end|>"]


def char_tokenizer(extra_tokens: list[str] | None = None, chat_template: str = CHATML):
    """A character-level tokenizer: ids 0-2 are <unk>, <|im_start|> (BOS), <|im_end|> (EOS = pad), then the
    printable ASCII characters, then ``extra_tokens`` (whole words, matched before characters)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab_list = SPECIAL_TOKENS + chars + [t for t in (extra_tokens or []) if t not in chars]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    pattern = "|".join(sorted(map(_escape, extra_tokens or []), key=len, reverse=True) + ["."])
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(f"(?m:{pattern})"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|im_end|>")
    fast.chat_template = chat_template
    return fast


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def tiny_llama(vocab_size: int, *, seed: int = 0, layers: int = 2, hidden: int = 64, heads: int = 4,
               kv_heads: int = 2, intermediate: int = 128, tie: bool = True, max_positions: int = 2048):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=max_positions, tie_word_embeddings=tie, bos_token_id=1,
                      eos_token_id=2, pad_token_id=2, rope_theta=10000.0)
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 2
    return model


def save_tiny(model, tokenizer, out) -> None:
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
