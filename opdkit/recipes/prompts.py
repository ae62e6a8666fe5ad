"""Prompt sets (paper §5.2): bare questions, template rewriting, mixing sources, and a synthetic arithmetic set.

Prompt files carry instruction templates around the question. The paper's two math templates:

* DAPO: ``Solve the following math problem step by step. The last line of your response should be of the form
  Answer: $Answer (without quotes) where $Answer is the answer to the problem.\\n\\n{question}\\n\\nRemember to put
  your answer on its own line after "Answer:".``
* teacher-aligned (JustRL, DeepMath, the benchmarks): ``{question} Please reason step by step, and put your
  final answer within \\boxed{}.``

``strip_template`` recovers the bare question from either (and from the ``\\boxed{{}}`` typo of the reference
repo's processed DAPO file, and the DeepScaleR ``Let's think step by step...`` suffix), so deduplication compares
questions rather than templates, and ``opdkit prompts rewrite`` can put a question into another template.
"""

from __future__ import annotations

import copy
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from ..config import ConfigError, _help
from ..data import DatasetError, _lookup, normalise_row, read_rows, row_label
from .common import BOXED_SUFFIX, check_output_path, write_rows

# name -> (prefix pattern, suffix pattern); either may be None. Whitespace in the templates is flexible.
TEMPLATES: dict[str, tuple[Optional[re.Pattern], Optional[re.Pattern]]] = {
    "dapo": (
        re.compile(r"^\s*Solve the following math problem step by step\.\s+The last line of your response should be "
                   r"of the form Answer:\s*\$Answer \(without quotes\) where \$Answer is the answer to the "
                   r"problem\.\s*"),
        re.compile(r"\s*Remember to put your answer on its own line after \"Answer:\"\.?\s*$"),
    ),
    "boxed": (None, re.compile(r"\s*Please reason step by step,? and put your final answer within "
                               r"\\boxed\{\{?\}\}?\.?\s*$")),
    "boxed_lets_think": (None, re.compile(r"\s*Let'?s think step by step and output the final answer within "
                                          r"\\boxed\{\{?\}\}?\.?\s*$")),
}

BOXED_TEMPLATE = "{question} " + BOXED_SUFFIX
DAPO_TEMPLATE = ("Solve the following math problem step by step. The last line of your response should be of the "
                 "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{question}\n\n"
                 "Remember to put your answer on its own line after \"Answer:\".")
NAMED_TEMPLATES = {"boxed": BOXED_TEMPLATE, "dapo": DAPO_TEMPLATE}


def strip_template(text: str) -> tuple[str, str | None]:
    """(bare question, name of the template found) for a prompt text; (text stripped, None) if none matched.

    A template counts as found only if its prefix (when it has one) and its suffix both match.
    """
    for name, (prefix, suffix) in TEMPLATES.items():
        body = text
        if prefix is not None:
            m = prefix.search(body)
            if not m:
                continue
            body = body[m.end():]
        if suffix is not None:
            m = suffix.search(body)
            if not m:
                continue
            body = body[:m.start()]
        return body.strip(), name
    return text.strip(), None


def bare_question(row: dict, columns: dict, question_field: str | None, where: str) -> tuple[str, str | None]:
    """The question of a row without its instruction template, and how it was found.

    With ``question_field`` (a dotted column such as ``extra_info.question``) that column is used when it is
    a non-empty string; otherwise the last user message with its template stripped.
    """
    if question_field:
        value = _lookup(row, question_field)
        if isinstance(value, str) and value.strip():
            return value.strip(), f"column:{question_field}"
    msgs, _, _, _ = normalise_row(row, columns, where)
    return strip_template(msgs[-1]["content"])


def fill_template(template: str, question: str) -> str:
    """Put the question into a template at ``{question}`` (plain replacement: ``\\boxed{}`` stays as it is)."""
    return template.replace("{question}", question)


def set_last_user_message(row: dict, columns: dict, text: str, where: str) -> dict:
    """A copy of the row with the text of its last user message replaced (plain, chat or verl rows)."""
    row = copy.deepcopy(row)
    col = {"prompt": "prompt", "messages": "messages", **columns}
    for key in (col["prompt"], col["messages"]):
        value = _lookup(row, key)
        parent, leaf = _parent(row, key)
        if isinstance(value, str) and key == col["prompt"]:
            parent[leaf] = text
            return row
        if isinstance(value, list) and value:
            users = [i for i, m in enumerate(value) if isinstance(m, dict) and m.get("role") == "user"]
            if users:
                value[users[-1]]["content"] = text
                return row
    raise DatasetError(f"{where}: no user prompt to rewrite (looked at '{col['prompt']}' and '{col['messages']}')")


def _parent(row: dict, dotted: str) -> tuple[dict, str]:
    parts = dotted.split(".")
    node = row
    for part in parts[:-1]:
        node = node.get(part, {}) if isinstance(node, dict) else {}
    return node, parts[-1]


# --------------------------------------------------------------------------------------------------
# opdkit prompts rewrite
# --------------------------------------------------------------------------------------------------


@dataclass
class RewriteConfig:
    input: str = _help("prompt file to rewrite (.jsonl / .parquet)", default="")
    output: str = _help("rewritten file (.jsonl / .parquet); rows keep their other columns", default="")
    template: str = _help("new template with a {question} placeholder, or a name: boxed (the teacher-aligned "
                          "template) or dapo", default="boxed")
    columns: dict = _help("map fields (prompt, messages) to columns", default_factory=dict)
    question_field: Optional[str] = _help("column holding the bare question, used when present "
                                          "(e.g. extra_info.question)", default=None)
    unrecognised: Literal["keep", "drop", "error"] = _help(
        "rows whose template is not recognised: keep (the whole text is the question), drop, or error",
        default="error")
    limit: Optional[int] = _help("rewrite only the first N rows", default=None)

    def validate(self) -> None:
        if not self.input or not self.output:
            raise ConfigError("input and output are required, e.g. input=dapo.parquet output=dapo_boxed.parquet")
        check_output_path(self.output, "output")
        if "{question}" not in NAMED_TEMPLATES.get(self.template, self.template):
            raise ConfigError(f"template must contain {{question}} or be one of {', '.join(NAMED_TEMPLATES)}; "
                              f"got {self.template!r}")


def rewrite_rows(rows: list[dict], cfg: RewriteConfig, path: str = "input") -> tuple[list[dict], dict]:
    """Rows with their prompt put into ``cfg.template``; the bare question is also stored as ``question``
    (inside ``extra_info`` for verl rows). Returns (rows, counts of the templates found)."""
    template = NAMED_TEMPLATES.get(cfg.template, cfg.template)
    out, found = [], {}
    for i, row in enumerate(rows):
        where = row_label(path, i)
        question, how = bare_question(row, cfg.columns, cfg.question_field, where)
        key = how or "unrecognised"
        found[key] = found.get(key, 0) + 1
        if how is None:
            if cfg.unrecognised == "error":
                raise DatasetError(f"{where}: no known template ({', '.join(TEMPLATES)}) around the question "
                                   f"{question[:80]!r}; set unrecognised=keep to use the whole text as the question, "
                                   f"unrecognised=drop to skip such rows, or question_field=<column>")
            if cfg.unrecognised == "drop":
                continue
        new = set_last_user_message(row, cfg.columns, fill_template(template, question), where)
        if isinstance(new.get("extra_info"), dict):
            new["extra_info"]["question"] = question
        else:
            new["question"] = question
        out.append(new)
    return out, found


def run_rewrite(cfg: RewriteConfig) -> dict:
    rows = read_rows(cfg.input)
    if cfg.limit is not None:
        rows = rows[:cfg.limit]
    out, found = rewrite_rows(rows, cfg, cfg.input)
    write_rows(cfg.output, out)
    return {"input": cfg.input, "output": cfg.output, "rows_in": len(rows), "rows_out": len(out),
            "templates_found": found}


# --------------------------------------------------------------------------------------------------
# opdkit prompts mix
# --------------------------------------------------------------------------------------------------


@dataclass
class MixConfig:
    sources: list = _help("list of {path, weight, columns?, question_field?}; weights are relative",
                          default_factory=list)
    output: str = _help("mixed prompt file (.jsonl / .parquet), verl schema", default="")
    total: Optional[int] = _help("rows in the mix (default: the most the ratios allow without repeating a row)",
                                 default=None)
    seed: int = _help("seed of the row draw and the final shuffle", default=0)
    replacement: bool = _help("allow drawing a source's rows more than once when it is too small",
                              default=False)

    def validate(self) -> None:
        if not self.sources:
            raise ConfigError("sources is required: a list of {path: file, weight: number}")
        for i, s in enumerate(self.sources):
            if not isinstance(s, dict) or "path" not in s:
                raise ConfigError(f"sources[{i}] must be a mapping with a path, got {s!r}")
            unknown = set(s) - {"path", "weight", "columns", "question_field"}
            if unknown:
                raise ConfigError(f"sources[{i}]: unknown keys {sorted(unknown)}; allowed: path, weight, columns, "
                                  f"question_field")
            if not isinstance(s.get("weight", 1), (int, float)) or s.get("weight", 1) <= 0:
                raise ConfigError(f"sources[{i}].weight must be a positive number, got {s.get('weight')!r}")
        if not self.output:
            raise ConfigError("output is required, e.g. output=runs/mix.parquet")
        check_output_path(self.output, "output")
        if self.total is not None and self.total <= 0:
            raise ConfigError(f"total must be > 0, got {self.total}")


def apportion(total: int, weights: list[float]) -> list[int]:
    """Split ``total`` into integer counts proportional to ``weights`` (largest remainder; sums to total)."""
    shares = [total * w / sum(weights) for w in weights]
    counts = [int(s) for s in shares]
    for i in sorted(range(len(weights)), key=lambda i: shares[i] - counts[i], reverse=True)[:total - sum(counts)]:
        counts[i] += 1
    return counts


def mix_rows(sources: list[tuple[str, list[dict], dict]], weights: list[float], total: int | None, seed: int,
             replacement: bool) -> tuple[list[dict], list[int]]:
    """Draw rows from each source in proportion to ``weights`` and shuffle them together.

    ``sources`` are (name, rows, source config). Rows are normalised to the verl schema (``data_source``,
    ``prompt`` messages, ``reward_model.ground_truth``, ``extra_info`` with the source file, row and the
    bare question), so sources with different columns mix into one file. Returns (rows, counts per source).
    """
    sizes = [len(rows) for _, rows, _ in sources]
    if total is None:
        total = int(min(n * sum(weights) / w for n, w in zip(sizes, weights)))
    counts = apportion(total, weights)
    rng = random.Random(seed)
    mixed = []
    for (name, rows, scfg), count in zip(sources, counts):
        if count > len(rows) and not replacement:
            raise ConfigError(f"source {name} has {len(rows)} rows but the mix needs {count} of them; lower total, "
                              f"change the weights, or set replacement=true")
        picks = rng.sample(range(len(rows)), count) if count <= len(rows) else \
            [rng.randrange(len(rows)) for _ in range(count)]
        for i in picks:
            where = row_label(name, i)
            msgs, _, answer, source = normalise_row(rows[i], scfg.get("columns") or {}, where)
            question, _ = bare_question(rows[i], scfg.get("columns") or {}, scfg.get("question_field"), where)
            mixed.append({"data_source": source or Path(name).stem, "prompt": msgs, "ability": "math",
                          "reward_model": {"ground_truth": answer, "style": "rule"},
                          "extra_info": {"source_file": name, "row": i, "question": question}})
    rng.shuffle(mixed)
    return mixed, counts


def run_mix(cfg: MixConfig) -> dict:
    sources = [(s["path"], read_rows(s["path"]), s) for s in cfg.sources]
    weights = [float(s.get("weight", 1)) for s in cfg.sources]
    rows, counts = mix_rows(sources, weights, cfg.total, cfg.seed, cfg.replacement)
    write_rows(cfg.output, rows)
    return {"output": cfg.output, "rows": len(rows),
            "per_source": {s["path"]: {"weight": w, "rows": c, "available": len(r)}
                           for s, w, c, (_, r, _) in zip(cfg.sources, weights, counts, sources)}}


# --------------------------------------------------------------------------------------------------
# opdkit prompts arithmetic: a synthetic verifiable task small models can do
# --------------------------------------------------------------------------------------------------

ONE_SHOT_QUESTION = (12, "+", 35)


def arithmetic_question(a: int, op: str, b: int) -> str:
    return f"What is {a} {op} {b}?"


def arithmetic_answer(a: int, op: str, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b}[op]


@dataclass
class ArithmeticConfig:
    output: str = _help("output file (.jsonl / .parquet)", default="")
    count: int = _help("number of problems", default=200)
    digits: int = _help("digits of each operand (2: 10..99)", default=2)
    ops: list = _help("operators drawn uniformly from + - *", default_factory=lambda: ["+"])
    one_shot: bool = _help("start every prompt with a solved example in the boxed format (SmolLM2-135M needs it "
                           "to answer in that format at all)", default=True)
    heldout: int = _help("also write this many further, distinct problems to <output stem>.heldout<ext> "
                         "(a test set disjoint from the training prompts)", default=0)
    seed: int = _help("seed of the draw", default=0)

    def validate(self) -> None:
        if not self.output:
            raise ConfigError("output is required, e.g. output=runs/arith.jsonl")
        check_output_path(self.output, "output")
        if self.count <= 0 or self.heldout < 0 or not 1 <= self.digits <= 6:
            raise ConfigError("count must be > 0, heldout >= 0 and digits in 1..6")
        if not self.ops or any(op not in ("+", "-", "*") for op in self.ops):
            raise ConfigError(f"ops must be a non-empty list of +, -, *; got {self.ops!r}")


def arithmetic_rows(cfg: ArithmeticConfig) -> list[dict]:
    """``count + heldout`` distinct problems ``What is a op b? <boxed instruction>`` with their answers, as chat rows.

    With ``one_shot`` every conversation starts with the worked example "12 + 35 = 47. The final answer is
    \\boxed{47}." in the same format, so even a 135M model answers with a checkable ``\\boxed{}``.
    """
    rng = random.Random(cfg.seed)
    lo, hi = (0 if cfg.digits == 1 else 10 ** (cfg.digits - 1)), 10 ** cfg.digits - 1
    space = (hi - lo + 1) ** 2 * len(cfg.ops)
    if cfg.count + cfg.heldout > space - 1:
        raise ConfigError(f"count + heldout = {cfg.count + cfg.heldout} is more than the {space - 1} distinct "
                          f"{cfg.digits}-digit problems")
    a0, op0, b0 = ONE_SHOT_QUESTION
    shot = [{"role": "user", "content": f"{arithmetic_question(a0, op0, b0)} {BOXED_SUFFIX}"},
            {"role": "assistant", "content": f"{a0} {op0} {b0} = {arithmetic_answer(a0, op0, b0)}. "
                                             f"The final answer is \\boxed{{{arithmetic_answer(a0, op0, b0)}}}."}]
    seen, rows = {ONE_SHOT_QUESTION}, []
    while len(rows) < cfg.count + cfg.heldout:
        problem = (rng.randint(lo, hi), rng.choice(cfg.ops), rng.randint(lo, hi))
        if problem in seen:
            continue
        seen.add(problem)
        user = {"role": "user", "content": f"{arithmetic_question(*problem)} {BOXED_SUFFIX}"}
        rows.append({"messages": (shot if cfg.one_shot else []) + [user],
                     "answer": str(arithmetic_answer(*problem)), "data_source": "arithmetic"})
    return rows


def run_arithmetic(cfg: ArithmeticConfig) -> dict:
    rows = arithmetic_rows(cfg)
    write_rows(cfg.output, rows[:cfg.count])
    out = {"output": cfg.output, "rows": cfg.count, "example": rows[0]["messages"][-1]["content"]}
    if cfg.heldout:
        path = Path(cfg.output)
        heldout = path.with_name(f"{path.stem}.heldout{path.suffix}")
        write_rows(heldout, rows[cfg.count:])
        out.update({"heldout": str(heldout), "heldout_rows": cfg.heldout})
    return out
