"""Model resolution and tokenizer compatibility checks."""

import pytest

from opdkit.models import ModelNotFoundError, TokenizerMismatchError, check_tokenizers, resolve_model_path
from opdkit.tiny import char_tokenizer


def test_missing_model_error_lists_what_is_accepted(tmp_path):
    with pytest.raises(ModelNotFoundError, match="smollm2-135m-instruct"):
        resolve_model_path(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        resolve_model_path(tmp_path / "empty")
    with pytest.raises(ModelNotFoundError, match="GGUF file not found"):
        resolve_model_path(tmp_path / "x.gguf")


def test_same_tokenizer_is_accepted():
    tok = char_tokenizer()
    assert check_tokenizers(tok, tok, len(tok), len(tok)).shared_vocab_size == len(tok)


def test_padded_embeddings_compare_on_shared_ids_with_a_warning():
    tok = char_tokenizer()
    check = check_tokenizers(tok, tok, len(tok) + 28, len(tok) + 92)
    assert check.shared_vocab_size == len(tok) + 28
    assert "shared ids" in check.warnings[0]


def test_extra_added_tokens_at_the_end_are_tolerated():
    small, big = char_tokenizer(), char_tokenizer(extra_tokens=["<think>", "</think>"])
    check = check_tokenizers(small, big, len(small), len(big))
    assert check.shared_vocab_size == len(small)


def test_different_tokenizers_are_an_error_naming_both():
    a = char_tokenizer()
    b = char_tokenizer(extra_tokens=["Answer:"])
    vocab = dict(b.get_vocab())
    # Build a genuinely different mapping: swap two ids.
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    c = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")))
    with pytest.raises(TokenizerMismatchError, match=r"studentA and teacherB use different tokenizers .*'a'"):
        check_tokenizers(a, c, len(a), len(c), "studentA", "teacherB")
