"""Final-answer extraction and checking.

Only an explicit answer counts: the last ``\\boxed{...}`` or the last line starting with ``Answer:``.
Free text is never scored, because a verifier can pull a restated expression such as "7 + 7" out of it
and call a wrong response correct (platform notes §6). Equivalence is decided by math-verify.
"""

from __future__ import annotations

import logging
import re
import threading
from functools import lru_cache

# math-verify's timeouts use SIGALRM, which only works in the main thread; elsewhere we run without them.
logging.getLogger("math_verify").setLevel(logging.ERROR)


def _timeout() -> int | None:
    return 5 if threading.current_thread() is threading.main_thread() else None

ANSWER_LINE = re.compile(r"^\s*\**\s*answer\s*[:：]\s*\**\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces, else None."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    for start in reversed(starts):
        depth, i = 1, start
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start:i - 1].strip()
    return None


def extract_answer(text: str) -> str | None:
    """The response's explicit final answer: last \\boxed{} or last "Answer: ..." line; None if neither."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    lines = ANSWER_LINE.findall(text)
    if lines:
        answer = lines[-1].strip().rstrip(".").strip().strip("$").strip()
        return answer or None
    return None


def has_final_answer(text: str) -> bool:
    return extract_answer(text) is not None


def normalise_gold(gold: str) -> str:
    gold = str(gold).strip()
    boxed = last_boxed(gold)
    return boxed if boxed is not None else gold.strip("$").strip()


@lru_cache(maxsize=65536)
def _parse(expr: str):
    from math_verify import parse
    from math_verify.parser import ExprExtractionConfig, LatexExtractionConfig

    # Wrapping in \boxed{} makes math-verify read the whole string as one answer rather than searching it.
    return parse(f"\\boxed{{{expr}}}", extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                 parsing_timeout=_timeout())


def answers_match(predicted: str, gold: str) -> bool:
    """math-verify equivalence of two answer strings, with a plain string comparison as a fallback."""
    from math_verify import verify

    pred, ref = predicted.strip(), normalise_gold(gold)
    if _norm(pred) == _norm(ref):
        return True
    try:
        parsed_ref, parsed_pred = _parse(ref), _parse(pred)
        if not parsed_ref or not parsed_pred:
            return False
        return bool(verify(parsed_ref, parsed_pred, timeout_seconds=_timeout()))
    except Exception:  # math-verify can fail on exotic LaTeX; an unparseable answer is not correct
        return False


def _norm(s: str) -> str:
    return re.sub(r"\s+", "", s).rstrip(".").lower()


def score_response(text: str, gold: str | None) -> float | None:
    """1.0 correct, 0.0 wrong or no explicit answer, None when there is no gold answer."""
    if gold is None:
        return None
    answer = extract_answer(text)
    if answer is None:
        return 0.0
    return 1.0 if answers_match(answer, gold) else 0.0
