"""The study's synthetic reasoning task: a ten-position dial turned up and down, solved step by step.

A *problem* is a start value and a chain of operations mod 10 ("turn it up 5", "turn it down 3"). Two axes are
under our control, which is what the paper's phenomenology needs:

* **capability**: which operations a model was trained on (the base student only ever sees "up"; a teacher with
  new capability also saw "down");
* **thinking pattern**: the surface form of the step-by-step solution. Pattern ``A`` writes
  ``7 + 5 = 2 . 2 - 3 = 9 .`` and ends with an ``Answer: 9`` line; pattern ``B`` computes the same thing as
  ``7 plus 5 makes 2 ; 2 minus 3 makes 9 ; so \\boxed{ 9 }``. Both final answers are graded by
  ``opdkit.answers`` (``Answer:`` line or ``\\boxed{}``).

Prompts are word problems with filler (a name, a colour and an object per problem) so the word-level vocabulary
has a few hundred tokens: with k = 16 the top-k sets cover ~6% of it, and overlapping sets are not a matter of
chance. Two prompt *templates* wrap the same problem (``quiz`` and ``plain``) for the teacher-aligned template
experiment (paper §5.2a). Everything is seeded: the same seed gives the same problems, prompts and responses.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from ..errors import InvalidInput

MODULUS = 10
# Operands 1..3: a 30-fact table per operation, which a 2-layer model learns in a few hundred steps
MAX_OPERAND = 3

NAMES = ("Ada Ben Cara Dan Eve Finn Gia Hugo Iris Jack Kai Lena Milo Nora Omar Pia Quinn Rosa Sam Tara Uma Vic Wes "
         "Xena Yuri Zoe Alba Bram Cleo Dario Elin Femi Gus Hana Ivo Jana Koa Lior Mina Nils Ola Pavel Rhea Soren Tomo "
         "Ugo Vera Wim Yara Zane Abel Bea Cyrus Dina Ezra Faye Gil Hedda Ines Joel Kira Luca Maren Noor Otto Pippa "
         "Remy Sana Teo Una Vito Willa Xavi Yusuf Zita Anouk Boris Celia Deniz Emre").split()
OBJECTS = ("clock radio oven safe lock meter gauge scale timer compass lamp fan heater stove boiler kettle mixer pump "
           "valve engine motor drill lathe press loom organ piano synth amp phone pager modem router camera "
           "lens scope beacon buoy crane winch hoist lift elevator turbine mill kiln forge furnace freezer cooler "
           "washer dryer blender grinder roaster toaster juicer printer plotter scanner monitor console tuner "
           "dimmer throttle rudder compressor generator dynamo sonar radar antenna telescope microscope "
           "metronome odometer barometer").split()
COLOURS = ("red blue green amber violet silver golden black white grey orange purple teal pink brown ivory navy olive "
           "crimson azure").split()
TEMPLATE_WORDS = "question : give the answer . solve this step by step".split()
# Operation words in prompts. The student never sees "down"; pattern-B words never appear in prompts.
OPERATIONS: dict[str, dict] = {
    "up": {"word": "up", "symbol": "+", "spoken": "plus", "apply": lambda x, y: (x + y) % MODULUS},
    "down": {"word": "down", "symbol": "-", "spoken": "minus", "apply": lambda x, y: (x - y) % MODULUS},
}
PROMPT_WORDS = "sets the dial to . turn what does show ?".split()
RESPONSE_WORDS = ["+", "-", "=", ".", "\n", "Answer:", "plus", "minus", "makes", ";", "so", "\\boxed{", "}"]
SPECIAL_TOKENS = ["<unk>", "<|im_start|>", "<|im_end|>"]
ROLES = ["system", "user", "assistant"]
# A compact ChatML: role and content separated by a space, no newlines (they would cost a token each).
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")


@dataclass(frozen=True)
class Problem:
    """start, then (operation, operand) steps, all mod 10; name/colour/object are prompt filler."""

    start: int
    steps: tuple[tuple[str, int], ...]
    name: str
    colour: str
    obj: str

    def results(self) -> list[int]:
        """The running value after each step."""
        value, out = self.start, []
        for op, operand in self.steps:
            value = OPERATIONS[op]["apply"](value, operand)
            out.append(value)
        return out

    @property
    def answer(self) -> int:
        return self.results()[-1]

    @property
    def key(self) -> tuple:
        """What makes two problems the same computation (filler aside)."""
        return (self.start, self.steps)


def make_problems(n: int, *, ops: tuple[str, ...], depth: int | tuple[int, int], seed: int,
                  max_operand: int = MAX_OPERAND, exclude: set | None = None,
                  op_weights: tuple[float, ...] | None = None,
                  operand_limits: dict[str, int] | None = None) -> list[Problem]:
    """``n`` random problems with operations drawn from ``ops`` (uniformly, or with ``op_weights``) and ``depth``
    steps (or a (lo, hi) range); operands are 1..max_operand, or 1..``operand_limits[op]`` for the operations it
    names; computations in ``exclude`` (``Problem.key``) are never drawn, which keeps held-out sets disjoint."""
    unknown = set(ops) - set(OPERATIONS)
    if unknown:
        raise InvalidInput(f"unknown operations {sorted(unknown)}; choose from {sorted(OPERATIONS)}")
    lo, hi = (depth, depth) if isinstance(depth, int) else depth
    rng = random.Random(seed)
    exclude = exclude or set()
    limits = operand_limits or {}
    out: list[Problem] = []
    for _ in range(n * 100):
        if len(out) == n:
            break
        chosen = [rng.choices(ops, op_weights)[0] for _ in range(rng.randint(lo, hi))]
        steps = tuple((op, rng.randint(1, limits.get(op, max_operand))) for op in chosen)
        p = Problem(rng.randrange(MODULUS), steps, rng.choice(NAMES), rng.choice(COLOURS), rng.choice(OBJECTS))
        if p.key not in exclude:
            out.append(p)
    if len(out) < n:
        raise InvalidInput(f"could only draw {len(out)} of {n} problems outside the excluded set; lower n")
    return out


def problem_text(p: Problem) -> str:
    parts = [f"{p.name} sets the {p.colour} {p.obj} dial to {p.start} ."]
    parts += [f"turn {OPERATIONS[op]['word']} {operand} ." for op, operand in p.steps]
    parts.append("what does the dial show ?")
    return " ".join(parts)


TEMPLATES: dict[str, Callable[[str], str]] = {
    "plain": lambda body: f"{body} solve this step by step .",
    "quiz": lambda body: f"question : {body} give the answer .",
}


def careless_answer(p: Problem, slip_rate: float, rng: random.Random) -> int:
    """The final answer a careless solver writes: the correct one, except that with probability ``slip_rate``
    it copies a wrong digit onto the answer line (the data of an imperfect distillation source)."""
    if rng.random() < slip_rate:
        return (p.answer + rng.randrange(1, MODULUS)) % MODULUS
    return p.answer


def _steps(p: Problem) -> list[tuple[int, str, int, int]]:
    """(value before, operation, operand, value after) per step."""
    out, value = [], p.start
    for (op, operand), result in zip(p.steps, p.results()):
        out.append((value, op, operand, result))
        value = result
    return out


def _pattern_a(p: Problem, answer: int) -> str:
    return " ".join(f"{v} {OPERATIONS[op]['symbol']} {n} = {r} ." for v, op, n, r in _steps(p)) + f"\nAnswer: {answer}"


def _pattern_b(p: Problem, answer: int) -> str:
    return (" ".join(f"{v} {OPERATIONS[op]['spoken']} {n} makes {r} ;" for v, op, n, r in _steps(p))
            + f" so \\boxed{{ {answer} }}")


PATTERNS: dict[str, Callable[[Problem, int], str]] = {"A": _pattern_a, "B": _pattern_b}


def vocabulary() -> list[str]:
    words = (SPECIAL_TOKENS + ROLES + [str(d) for d in range(MODULUS)] + RESPONSE_WORDS + PROMPT_WORDS
             + TEMPLATE_WORDS + [o["word"] for o in OPERATIONS.values()] + NAMES + COLOURS + OBJECTS)
    return list(dict.fromkeys(words))


def word_tokenizer():
    """A word-level fast tokenizer over ``vocabulary()``: words split on spaces, ``\\n`` is a token of its own,
    ids 0-2 are <unk>, <|im_start|> (BOS) and <|im_end|> (EOS = pad), and the chat template is a compact ChatML."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(" +"), "removed"),
                                                 pre_tokenizers.Split(Regex("\n"), "isolated")])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def prompt_row(p: Problem, template: str) -> dict:
    """An opdkit prompt row (``opdkit distill`` / ``eval`` / ``rollout``): the user message and the answer."""
    return {"messages": [{"role": "user", "content": TEMPLATES[template](problem_text(p))}],
            "answer": str(p.answer), "data_source": f"dial_{template}"}


def sft_row(p: Problem, template: str, pattern: str, written_answer: int | None = None) -> dict:
    """An opdkit SFT row: the prompt and a correct step-by-step solution in ``pattern`` whose answer line says
    ``written_answer`` (default: the correct answer). The row's ``answer`` (the grading key) is always correct."""
    row = prompt_row(p, template)
    solution = PATTERNS[pattern](p, p.answer if written_answer is None else written_answer)
    row["messages"] = row["messages"] + [{"role": "assistant", "content": solution}]
    return row
