"""Tokenizer and chat-template compatibility of a student and a teacher (the probe's static checks).

OPD feeds the student's token ids to the teacher, so the two must agree on what the ids mean
(``models.check_tokenizers``), on which tokens are special, on how a conversation is laid out (role markers,
BOS, end-of-turn), and on thinking tags such as ``<think>``. Each function here takes tokenizers (and, for
rollouts, decoded texts) and returns plain JSON-ready dicts; none loads a model.
"""

from __future__ import annotations

import difflib

from .data import render_prompt

# Thinking markers used by current reasoning models (Qwen3 / DeepSeek-R1 style, OpenThoughts, Claude-style XML).
THINK_TAGS = ("<think>", "</think>", "<thinking>", "</thinking>", "<|begin_of_thought|>", "<|end_of_thought|>")
SPECIAL_ATTRS = ("bos_token", "eos_token", "pad_token", "unk_token")


def special_tokens(tokenizer) -> dict:
    """The named special tokens with their ids, and the list of all special tokens."""
    out = {}
    for attr in SPECIAL_ATTRS:
        token = getattr(tokenizer, attr, None)
        out[attr] = None if token is None else {"token": str(token), "id": tokenizer.convert_tokens_to_ids(token)}
    out["all"] = sorted(map(str, getattr(tokenizer, "all_special_tokens", []) or []))
    return out


def compare_special_tokens(student_tok, teacher_tok) -> dict:
    """Named special tokens of both tokenizers and where they differ (a differing EOS or BOS changes the
    layout of every sequence the teacher scores)."""
    s, t = special_tokens(student_tok), special_tokens(teacher_tok)
    differing = [attr for attr in SPECIAL_ATTRS if s[attr] != t[attr]]
    return {"student": s, "teacher": t, "differing": differing,
            "only_student": sorted(set(s["all"]) - set(t["all"])),
            "only_teacher": sorted(set(t["all"]) - set(s["all"]))}


def conversation_ids(tokenizer, messages: list[dict], template_kwargs: dict | None = None) -> list[int]:
    """Token ids of a whole conversation (ending with an assistant turn) rendered by the tokenizer's template."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, **(template_kwargs or {}))
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer("\n\n".join(m["content"] for m in messages) + "\n")["input_ids"]


def diff_token_ids(student_ids: list[int], teacher_ids: list[int], tokenizer, max_hunks: int = 6) -> dict:
    """Token-by-token diff of two renderings of one conversation (both read with ``tokenizer``'s vocabulary).

    Returns whether they are identical, the index of the first differing token, how many tokens of each
    side fall outside the matching blocks, and up to ``max_hunks`` differing spans as token strings.
    """
    matcher = difflib.SequenceMatcher(a=student_ids, b=teacher_ids, autojunk=False)
    hunks, first, diff_s, diff_t = [], None, 0, 0
    for op, a0, a1, b0, b1 in matcher.get_opcodes():
        if op == "equal":
            continue
        first = a0 if first is None else first
        diff_s, diff_t = diff_s + (a1 - a0), diff_t + (b1 - b0)
        if len(hunks) < max_hunks:
            hunks.append({"op": op, "student_at": a0, "teacher_at": b0,
                          "student": tokenizer.convert_ids_to_tokens(student_ids[a0:a1]),
                          "teacher": tokenizer.convert_ids_to_tokens(teacher_ids[b0:b1])})
    return {"identical": first is None, "first_difference": first, "student_tokens": len(student_ids),
            "teacher_tokens": len(teacher_ids), "differing_student_tokens": diff_s,
            "differing_teacher_tokens": diff_t, "hunks": hunks}


def compare_templates(student_tok, teacher_tok, messages: list[dict], reply: str, *,
                      student_kwargs: dict | None = None, teacher_kwargs: dict | None = None) -> dict:
    """Render one conversation with both chat templates and diff the token ids.

    ``generation_prompt``: the prompt a model answers (what the teacher scores the student's response after);
    ``conversation``: the prompt plus an assistant ``reply``, which also shows the end-of-turn markup.
    Both renderings are tokenised with their own tokenizer; ids are compared as ids (the vocabularies were
    already checked to agree).
    """
    convo = messages + [{"role": "assistant", "content": reply}]
    gen = diff_token_ids(render_prompt(student_tok, messages, student_kwargs),
                         render_prompt(teacher_tok, messages, teacher_kwargs), student_tok)
    full = diff_token_ids(conversation_ids(student_tok, convo, student_kwargs),
                          conversation_ids(teacher_tok, convo, teacher_kwargs), student_tok)
    return {"identical": gen["identical"] and full["identical"], "generation_prompt": gen, "conversation": full,
            "student_has_template": bool(getattr(student_tok, "chat_template", None)),
            "teacher_has_template": bool(getattr(teacher_tok, "chat_template", None))}


def _template_source(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates
        return "\n".join(map(str, template.values()))
    return template or ""


def thinking_support(tokenizer, messages: list[dict], template_kwargs: dict | None = None) -> dict:
    """How one tokenizer handles thinking: tags in its vocabulary, mentions in its template, whether
    ``enable_thinking`` changes the rendered prompt and whether the generation prompt opens a think block."""
    vocab = tokenizer.get_vocab()
    source = _template_source(tokenizer)
    out = {"think_tokens": [t for t in THINK_TAGS if t in vocab],
           "template_mentions_think": any(t in source for t in THINK_TAGS),
           "template_uses_enable_thinking": "enable_thinking" in source,
           "enable_thinking_changes_prompt": False}
    base = render_prompt(tokenizer, messages, template_kwargs)
    if out["template_uses_enable_thinking"]:
        variants = {flag: render_prompt(tokenizer, messages, {**(template_kwargs or {}), "enable_thinking": flag})
                    for flag in (True, False)}
        out["enable_thinking_changes_prompt"] = variants[True] != variants[False]
    tail = tokenizer.decode(base[-8:])
    out["generation_prompt_opens_think"] = any(tail.rstrip().endswith(t) for t in THINK_TAGS if not t.startswith("</"))
    return out


def think_fraction(texts: list[str]) -> float:
    """Share of responses that contain any thinking tag (decode them with special tokens kept)."""
    if not texts:
        return float("nan")
    return sum(any(tag in t for tag in THINK_TAGS) for t in texts) / len(texts)
