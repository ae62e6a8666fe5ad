"""The README's config reference lists every key, and its first commands are the ones .ci/run uses."""

from pathlib import Path

from opdkit.config import DistillConfig, describe

ROOT = Path(__file__).resolve().parents[1]


def test_every_config_key_is_documented():
    readme = (ROOT / "README.md").read_text()
    missing = [key for key, _, _ in describe(DistillConfig) if f"`{key}`" not in readme]
    assert not missing, f"README config reference lacks {missing}; regenerate with `opdkit config --markdown`"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = "sh scripts/setup.sh --test && .venv/bin/python -m pytest"
    assert command in readme.split("\n## ")[0]  # in the introduction, before the first section
    assert command in (ROOT / ".ci" / "run").read_text()
