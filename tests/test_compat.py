"""Tokenizer, template and thinking-tag comparisons of ``opdkit.compat`` on hand-built tokenizers."""

from opdkit.compat import compare_special_tokens, compare_templates, diff_token_ids, think_fraction, thinking_support
from opdkit.tiny import char_tokenizer

# A Qwen3-style template: enable_thinking=False pre-fills an empty think block after the generation prompt.
THINKING = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
            "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}"
            "{% endif %}{% endif %}")
PLAIN = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
MESSAGES = [{"role": "user", "content": "Hi"}]


def test_diff_token_ids_by_hand():
    tok = char_tokenizer()
    ids = tok("abcdef", add_special_tokens=False)["input_ids"]
    same = diff_token_ids(ids, list(ids), tok)
    assert same["identical"] and same["first_difference"] is None and same["hunks"] == []
    other = tok("abXdefY", add_special_tokens=False)["input_ids"]
    d = diff_token_ids(ids, other, tok)
    # 'c' replaced by 'X' at index 2; 'Y' inserted at the end
    assert not d["identical"] and d["first_difference"] == 2
    assert d["differing_student_tokens"] == 1 and d["differing_teacher_tokens"] == 2
    assert d["hunks"][0] == {"op": "replace", "student_at": 2, "teacher_at": 2, "student": ["c"], "teacher": ["X"]}
    assert d["hunks"][1]["op"] == "insert" and d["hunks"][1]["teacher"] == ["Y"]


def test_templates_identical_and_different():
    chatml = char_tokenizer()
    same = compare_templates(chatml, char_tokenizer(), MESSAGES, "Hello")
    assert same["identical"]
    diff = compare_templates(chatml, char_tokenizer(chat_template=PLAIN), MESSAGES, "Hello")
    assert not diff["identical"]
    # ChatML starts with <|im_start|>, the plain template with 'u' of "user": they differ from token 0
    assert diff["generation_prompt"]["first_difference"] == 0
    assert diff["generation_prompt"]["hunks"][0]["student"][0] == "<|im_start|>"


def test_thinking_support_and_rollout_fraction():
    tok = char_tokenizer(extra_tokens=["<think>", "</think>"], chat_template=THINKING)
    info = thinking_support(tok, MESSAGES)
    assert info["think_tokens"] == ["<think>", "</think>"]
    assert info["template_mentions_think"] and info["template_uses_enable_thinking"]
    assert info["enable_thinking_changes_prompt"]
    assert not info["generation_prompt_opens_think"]  # the default renders no think block
    plain = thinking_support(char_tokenizer(), MESSAGES)
    assert plain["think_tokens"] == [] and not plain["template_mentions_think"]
    assert think_fraction(["<think>x</think> 4", "4", "so </think> 5", "6"]) == 0.5


def test_special_tokens_compared():
    a = char_tokenizer()
    b = char_tokenizer()
    b.eos_token = "<unk>"
    out = compare_special_tokens(a, b)
    assert out["differing"] == ["eos_token"]
    assert out["student"]["eos_token"] == {"token": "<|im_end|>", "id": 2}
    assert out["teacher"]["eos_token"] == {"token": "<unk>", "id": 0}
