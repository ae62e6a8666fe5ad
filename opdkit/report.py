"""``opdkit report RUN_DIR [RUN_DIR ...]``: one self-contained HTML page per set of runs.

It reads what ``opdkit distill`` writes (``metrics.jsonl``, ``samples.jsonl``, ``config.yaml``,
``summary.json``) and shows, with every run on the same axes:

* curves of the loss, reverse KL, the paper's token-level diagnostics (overlap ratio, overlap-token advantage,
  entropy gap, overlap masses; §4), grad norm and accuracy;
* the position-by-step entropy heat-maps of §6.1 (from the ``diag/pos_A-B/*`` metrics), where late-sequence
  instability shows up first;
* sample rollouts, every token coloured by its reverse-KL estimate log p(ŷ_t) − log q(ŷ_t).

Figures are PNG files written next to the page (``<name>_figures/``) and embedded in it as base64, so the
HTML file alone is the whole report.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import math
import re
from pathlib import Path

import yaml

from .errors import InputNotFound
from .plots import plot_curves, series
from .tracking import console, read_metrics

# Figure groups: (title, metric keys); keys no run logged are dropped, empty groups skipped.
CURVE_GROUPS = [
    ("Loss and reverse KL", ["opd/loss", "opd/reverse_kl", "eval/reverse_kl", "opd/teacher_logp",
                             "opd/student_logp"]),
    ("Token-level diagnostics (paper §4)", ["diag/overlap_ratio", "diag/overlap_token_advantage",
                                            "diag/overlap_token_advantage_ref", "diag/entropy_gap",
                                            "diag/entropy_student", "diag/entropy_teacher",
                                            "diag/overlap_mass_student", "diag/overlap_mass_teacher",
                                            "diag/maxadv_prob_gap"]),
    ("Optimisation (paper App. B.2)", ["optim/grad_norm", "optim/lr", "diag/seq_reward_mean",
                                       "diag/reward_auroc"]),
    ("Task and rollouts", ["rollout/accuracy", "eval/accuracy", "rollout/len_mean", "eval/len_mean",
                           "rollout/truncated_frac"]),
]
HEATMAP_METRICS = ("entropy_student", "entropy_teacher", "reverse_kl")
POSITION_KEY = re.compile(r"^diag/pos_(\d+)-(\d+)/(.+)$")
KL_COLOUR_CAP = 5.0  # nats; |log p − log q| beyond this gets the full colour


def position_matrix(rows: list[dict], name: str) -> tuple[list[int], list[tuple[int, int]], list[list[float]]]:
    """The ``diag/pos_A-B/<name>`` metrics as a (position bins × steps) grid.

    Returns the steps, the [A, B] token spans (ascending) and values[bin][step] (NaN where not logged).
    """
    spans: set[tuple[int, int]] = set()
    for row in rows:
        for key in row:
            m = POSITION_KEY.match(key)
            if m and m.group(3) == name:
                spans.add((int(m.group(1)), int(m.group(2))))
    ordered = sorted(spans)
    steps = sorted({row["step"] for row in rows
                    if any(f"diag/pos_{a}-{b}/{name}" in row for a, b in ordered)})
    by_step = {}
    for row in rows:
        if row["step"] in steps:
            by_step.setdefault(row["step"], {}).update(row)
    grid = []
    for a, b in ordered:
        line = []
        for step in steps:
            value = by_step[step].get(f"diag/pos_{a}-{b}/{name}")
            line.append(float(value) if isinstance(value, (int, float)) and not isinstance(value, bool)
                        else math.nan)
        grid.append(line)
    return steps, ordered, grid


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes-to-unicode map, used by byte-level BPE tokenizers (Llama 3, Qwen, SmolLM)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


BYTE_DECODER = _byte_decoder()


def token_text(token: str) -> str:
    """Readable text of one vocabulary token: byte-level BPE symbols decoded, SentencePiece '▁' as a space."""
    if token and all(ch in BYTE_DECODER for ch in token):
        return bytes(BYTE_DECODER[ch] for ch in token).decode("utf-8", errors="replace")
    return token.replace("▁", " ")


def kl_colour(value: float, cap: float = KL_COLOUR_CAP) -> str:
    """Background colour of a token: red where the student is more confident than the teacher (log p > log q),
    blue where the teacher likes the token more; the strength is |value| / cap."""
    strength = min(abs(value) / cap, 1.0) if math.isfinite(value) else 1.0
    alpha = round(0.08 + 0.72 * strength, 3)
    return f"rgba(220,40,40,{alpha})" if value >= 0 else f"rgba(40,90,220,{alpha})"


def render_tokens(tokens: list[str], values: list[float]) -> str:
    spans = []
    for token, value in zip(tokens, values):
        text = token_text(token)
        shown = html.escape(text).replace("\n", "↵<br>")
        spans.append(f'<span class="tok" style="background:{kl_colour(value)}" '
                     f'title="{html.escape(repr(text))}: {value:.3f}">{shown or "&nbsp;"}</span>')
    return "".join(spans)


def read_samples(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "samples.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pick_samples(samples: list[dict], count: int) -> list[dict]:
    """Half from the first logged step, half from the last (how the student's tokens changed)."""
    usable = [s for s in samples if s.get("tokens") and s.get("token_reverse_kl")]
    if not usable or count <= 0:
        return []
    first, last = min(s["step"] for s in usable), max(s["step"] for s in usable)
    early = [s for s in usable if s["step"] == first][:max(1, count // 2)]
    late = [s for s in usable if s["step"] == last][:count - len(early)] if last != first else []
    return early + late


def _png(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def plot_heatmaps(runs: dict[str, list[dict]], out: Path) -> Path | None:
    """One row per run, one column per metric of ``HEATMAP_METRICS`` that was logged: position bin × step."""
    import matplotlib.pyplot as plt

    panels = []
    for name, rows in runs.items():
        for metric in HEATMAP_METRICS:
            steps, spans, grid = position_matrix(rows, metric)
            if steps and spans:
                panels.append((name, metric, steps, spans, grid))
    if not panels:
        return None
    cols = len({p[1] for p in panels})
    run_names = list(dict.fromkeys(p[0] for p in panels))
    metrics = list(dict.fromkeys(p[1] for p in panels))
    fig, axes = plt.subplots(len(run_names), cols, figsize=(4.6 * cols, 3.0 * len(run_names)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for name, metric, steps, spans, grid in panels:
        ax = axes[run_names.index(name)][metrics.index(metric)]
        ax.axis("on")
        edges_x = steps + [steps[-1] + (steps[-1] - steps[-2] if len(steps) > 1 else 1)]
        edges_y = [a for a, _ in spans] + [spans[-1][1] + 1]
        mesh = ax.pcolormesh(edges_x, edges_y, grid, cmap="magma", shading="flat")
        fig.colorbar(mesh, ax=ax, fraction=0.05, pad=0.02)
        ax.set_title(f"{name}: {metric}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("response position (token)", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def run_names(run_dirs: list[Path]) -> list[str]:
    """Short unique names: the directory name, or parent/name when two runs share it."""
    names = [Path(d).resolve().name for d in run_dirs]
    return [f"{Path(d).resolve().parent.name}/{n}" if names.count(n) > 1 else n for d, n in zip(run_dirs, names)]


def _first_last(rows: list[dict], key: str) -> tuple[float, float] | None:
    _, ys = series(rows, key)
    return (ys[0], ys[-1]) if ys else None


SUMMARY_KEYS = ["opd/reverse_kl", "eval/reverse_kl", "diag/overlap_ratio", "diag/overlap_token_advantage",
                "diag/entropy_gap", "diag/overlap_mass_student", "diag/overlap_mass_teacher", "optim/grad_norm",
                "rollout/accuracy", "eval/accuracy"]


def run_table(names: list[str], run_dirs: list[Path], runs: dict[str, list[dict]]) -> str:
    """Per run: what was distilled from what, and the first -> last value of the key metrics."""
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    lines = []
    configs = []
    for d in run_dirs:
        path = Path(d) / "config.yaml"
        configs.append(yaml.safe_load(path.read_text()) if path.is_file() else {})
    for label, getter in (("student", lambda c: c.get("student", {}).get("path")),
                          ("teacher", lambda c: c.get("teacher", {}).get("path")),
                          ("objective", lambda c: "{name} k={k} {strategy}".format(**c["objective"])
                           if c.get("objective") else None),
                          ("steps / lr", lambda c: f"{c['run']['steps']} / {c['optim']['lr']}"
                           if c.get("run") and c.get("optim") else None)):
        cells = "".join(f"<td>{html.escape(str(getter(c) or '–'))}</td>" for c in configs)
        lines.append(f"<tr><th>{label}</th>{cells}</tr>")
    for key in SUMMARY_KEYS:
        cells, any_value = [], False
        for n in names:
            fl = _first_last(runs[n], key)
            any_value |= fl is not None
            cells.append(f"<td>{fl[0]:.4g} → {fl[1]:.4g}</td>" if fl else "<td>–</td>")
        if any_value:
            lines.append(f"<tr><th>{key} (first → last)</th>{''.join(cells)}</tr>")
    for key in ("seconds_per_step", "wall_seconds"):
        values = []
        for d in run_dirs:
            p = Path(d) / "summary.json"
            summary = json.loads(p.read_text()) if p.is_file() else {}
            values.append(summary.get(key))
        if any(v is not None for v in values):
            cells = "".join(f"<td>{v:.3g}</td>" if isinstance(v, (int, float)) else "<td>–</td>" for v in values)
            lines.append(f"<tr><th>{key}</th>{cells}</tr>")
    return f"<table><tr><th></th>{head}</tr>{''.join(lines)}</table>"


STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1300px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 13px; } td, th { border: 1px solid #ddd; padding: 4px 8px; }
th { background: #f6f6f6; text-align: left; } img { max-width: 100%; }
.sample { border: 1px solid #ddd; border-radius: 6px; padding: 8px 10px; margin: 10px 0; }
.meta { font-size: 12px; color: #555; margin-bottom: 4px; }
.tokens { font-family: ui-monospace, monospace; font-size: 13px; line-height: 1.9; white-space: pre-wrap; }
.tok { border-radius: 3px; padding: 1px 0; } .note { font-size: 13px; color: #444; }
"""


def build_report(run_dirs: list[Path], out: Path, *, samples: int = 4, title: str = "") -> Path:
    """Write the HTML report of ``run_dirs`` to ``out`` (figures in ``<out stem>_figures/``); returns ``out``."""
    run_dirs = [Path(d) for d in run_dirs]
    for d in run_dirs:
        if not (d / "metrics.jsonl").is_file():
            raise InputNotFound(f"{d} is not an opdkit run directory: it has no metrics.jsonl "
                                f"(written by opdkit distill / opdkit demo)")
    names = run_names(run_dirs)
    runs = {n: read_metrics(d) for n, d in zip(names, run_dirs)}
    out = Path(out)
    fig_dir = out.parent / f"{out.stem}_figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    title = title or "opdkit report: " + ", ".join(names)
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p class='note'>generated {datetime.datetime.now().isoformat(timespec='seconds')} from "
             f"{', '.join(html.escape(str(d)) for d in run_dirs)}</p>",
             "<h2>Runs</h2>", run_table(names, run_dirs, runs)]
    for i, (group, keys) in enumerate(CURVE_GROUPS):
        try:
            png = plot_curves(runs, keys, fig_dir / f"curves_{i}.png", title=group)
        except ValueError:  # none of this group's metrics were logged
            continue
        parts += [f"<h2>{html.escape(group)}</h2>", f'<img alt="{html.escape(group)}" '
                  f'src="data:image/png;base64,{_png(png)}">']
    heat = plot_heatmaps(runs, fig_dir / "position_heatmaps.png")
    parts.append("<h2>By response position and step (paper §6.1)</h2>")
    if heat is not None:
        parts += ["<p class='note'>Mean over the tokens in each span of response positions, per training step. "
                  "In long-response runs the paper saw student entropy rise first at the end of responses and "
                  "move forward.</p>", f'<img alt="position heat-maps" src="data:image/png;base64,{_png(heat)}">']
    else:
        parts.append("<p class='note'>no diag/pos_A-B/* metrics in these runs</p>")
    parts.append("<h2>Sample rollouts</h2><p class='note'>Each token of the student's response is coloured by "
                 "log p(ŷ<sub>t</sub>) − log q(ŷ<sub>t</sub>), the one-sample reverse-KL estimate: "
                 "<span class='tok' style='background:rgba(220,40,40,.8)'>red</span> where the student is more "
                 "confident than the teacher, <span class='tok' style='background:rgba(40,90,220,.8)'>blue</span> "
                 f"where the teacher prefers the token (full colour at ±{KL_COLOUR_CAP:g} nats). Hover a token "
                 "for its value.</p>")
    for name, d in zip(names, run_dirs):
        chosen = pick_samples(read_samples(d), samples)
        if not chosen:
            continue
        parts.append(f"<h3>{html.escape(name)}</h3>")
        for s in chosen:
            kl = s["token_reverse_kl"]
            meta = (f"step {s['step']} · prompt: {html.escape(str(s.get('prompt', ''))[:200])} · "
                    f"mean {sum(kl) / len(kl):.3f} nats/token over {len(kl)} tokens")
            if s.get("answer") is not None:
                meta += f" · answer {html.escape(str(s['answer']))}, reward {s.get('reward')}"
            parts.append(f"<div class='sample'><div class='meta'>{meta}</div>"
                         f"<div class='tokens'>{render_tokens(s['tokens'], kl)}</div></div>")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")
    out.write_text(page, encoding="utf-8")
    return out


def _cmd_report(args) -> int:
    run_dirs = [Path(d) for d in args.run_dirs]
    out = Path(args.out) if args.out else (run_dirs[0] / "report.html" if len(run_dirs) == 1 else Path("report.html"))
    path = build_report(run_dirs, out, samples=args.samples, title=args.title or "")
    console.print(f"wrote {path} (figures in {path.parent / (path.stem + '_figures')})")
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("report", help="HTML report of one or more runs: curves, heat-maps, coloured samples")
    p.add_argument("run_dirs", nargs="+", help="run directories written by opdkit distill / demo")
    p.add_argument("--out", help="HTML file (default: RUN_DIR/report.html for one run, ./report.html for several)")
    p.add_argument("--samples", type=int, default=4, help="sample rollouts shown per run (first and last step)")
    p.add_argument("--title", help="page title")
    p.set_defaults(func=_cmd_report)
