"""``opdkit report`` on real (tiny) run directories, and its pure pieces on hand-built inputs."""

import base64
import math
import re

import matplotlib.image
import pytest

from opdkit.cli import main
from opdkit.report import kl_colour, pick_samples, position_matrix, render_tokens, token_text
from tests.conftest import tiny_overrides


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_dirs):
    from tests.conftest import addition_rows, write_jsonl

    root = tmp_path_factory.mktemp("report_runs")
    prompts = write_jsonl(root / "prompts.jsonl", addition_rows(24))
    runs = []
    for name, objective in (("topk", "topk"), ("sampled", "sampled")):
        out = root / name
        assert main(["distill", *tiny_overrides(tiny_dirs, prompts, out, **{"objective.name": objective,
                                                                             "run.log_samples": 2})]) == 0
        runs.append(out)
    return runs


def _not_blank(png_path):
    pixels = matplotlib.image.imread(png_path)
    return pixels.std() > 0.01  # a figure with curves or cells, not one flat colour


def test_report_renders_two_runs_on_the_same_axes(two_runs, tmp_path):
    out = tmp_path / "cmp.html"
    assert main(["report", *map(str, two_runs), "--out", str(out)]) == 0
    page = out.read_text()
    figures = sorted((tmp_path / "cmp_figures").glob("*.png"))
    names = {p.name for p in figures}
    assert {"curves_0.png", "curves_1.png", "curves_2.png", "position_heatmaps.png"} <= names
    for png in figures:
        assert png.stat().st_size > 5000 and _not_blank(png)
    # every figure is embedded: the page alone is the report
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == len(figures)
    assert all(base64.b64decode(e)[:8] == b"\x89PNG\r\n\x1a\n" for e in embedded)
    # both runs in the table, samples of both, coloured tokens with their values
    assert "<th>topk</th>" in page and "<th>sampled</th>" in page
    assert "diag/overlap_ratio (first → last)" in page
    assert page.count("class='sample'") == 8  # 4 per run: first and last step
    assert re.search(r'<span class="tok" style="background:rgba\(\d+,\d+,\d+,[0-9.]+\)" title="[^"]+: -?\d+\.\d{3}"',
                     page)


def test_report_default_path_and_bad_directory(two_runs, tmp_path, capsys):
    assert main(["report", str(two_runs[0])]) == 0
    assert (two_runs[0] / "report.html").stat().st_size > 10000
    assert main(["report", str(tmp_path)]) == 1
    assert "has no metrics.jsonl" in capsys.readouterr().err


def test_position_matrix_by_hand():
    rows = [{"step": 0, "eval/reverse_kl": 2.0},
            {"step": 1, "diag/pos_0-3/entropy_student": 1.0, "diag/pos_4-7/entropy_student": 2.0,
             "diag/pos_0-3/entropy_teacher": 9.0},
            {"step": 2, "diag/pos_0-3/entropy_student": 1.5}]  # a short step: no tokens past position 3
    steps, spans, grid = position_matrix(rows, "entropy_student")
    assert steps == [1, 2] and spans == [(0, 3), (4, 7)]
    assert grid[0] == [1.0, 1.5] and grid[1][0] == 2.0 and math.isnan(grid[1][1])
    assert position_matrix(rows, "overlap_ratio") == ([], [], [])


def test_tokens_are_shown_as_text_and_coloured_by_sign_and_size():
    assert token_text("Ġhello") == " hello" and token_text("Ċ") == "\n" and token_text("▁word") == " word"
    assert token_text("<|im_end|>") == "<|im_end|>" and token_text(" ") == " "
    assert token_text("Ã©") == "é"  # two byte-level symbols, one UTF-8 character
    assert kl_colour(10.0) == "rgba(220,40,40,0.8)" and kl_colour(-10.0) == "rgba(40,90,220,0.8)"
    assert kl_colour(0.0) == "rgba(220,40,40,0.08)"
    html = render_tokens(["a", "Ċ"], [1.0, -2.5])
    assert "↵<br>" in html and 'title="&#x27;a&#x27;: 1.000"' in html and "rgba(40,90,220" in html


def test_pick_samples_takes_first_and_last_step():
    rows = [{"step": s, "tokens": ["x"], "token_reverse_kl": [0.1], "i": i} for s in (1, 2, 3) for i in range(3)]
    picked = pick_samples(rows, 4)
    assert [(r["step"], r["i"]) for r in picked] == [(1, 0), (1, 1), (3, 0), (3, 1)]
    assert pick_samples([{"step": 1, "tokens": [], "token_reverse_kl": []}], 4) == []
