"""The generated parts of README.md (experiments/readme_common.py): headline table and named blocks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))

from readme_common import HEADLINE_BEGIN, HEADLINE_END, render_readme  # noqa: E402

README = f"""# title
intro
{HEADLINE_BEGIN}
old table
{HEADLINE_END}
middle
<!-- generated: exp_a.gen (by a script; do not edit) -->
stale text
<!-- /generated: exp_a.gen -->
between
<!-- generated: exp_b.other -->
<!-- /generated: exp_b.other -->
end
"""


def write_results(root: Path, name: str, quick: bool, headline: list, blocks: dict) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "results.json").write_text(json.dumps({
        "title": f"Title of {name}", "quick": quick, "command": f"python experiments/{name}.py",
        "headline": [{"what": w, "value": v} for w, v in headline], "readme_blocks": blocks}))


def test_headline_and_blocks_are_filled_from_results_and_the_rest_is_kept(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    write_results(tmp_path, "exp_a", False, [("SS", "60 → 50")], {"exp_a.gen": "| a | b |\n|---|---|\n| 1 | 2 |\n"})
    write_results(tmp_path, "exp_b", True, [("quick", "never shown")], {"exp_b.other": "quick block"})
    render_readme(tmp_path, readme, ["exp_a", "exp_b"])
    text = readme.read_text()
    assert "| SS | 60 → 50 | [exp_a](docs/results.md#title-of-exp_a): `python experiments/exp_a.py` |" in text
    assert "old table" not in text and "stale text" not in text and "never shown" not in text
    assert "<!-- generated: exp_a.gen (by a script; do not edit) -->\n| a | b |\n|---|---|\n| 1 | 2 |\n<!-- /generated: exp_a.gen -->" in text
    # a quick run never reaches the README: its block names the command instead
    assert "<!-- generated: exp_b.other -->\n(not generated yet: `python experiments/exp_b.py`)\n<!-- /generated: exp_b.other -->" in text
    for kept in ("# title\nintro\n", "\nmiddle\n", "\nbetween\n", "\nend\n"):
        assert kept in text
    render_readme(tmp_path, readme, ["exp_a", "exp_b"])
    assert readme.read_text() == text  # idempotent


def test_a_readme_without_markers_is_left_alone(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# plain\nno markers\n")
    write_results(tmp_path, "exp_a", False, [("x", "1")], {"exp_a.gen": "block"})
    render_readme(tmp_path, readme, ["exp_a"])
    assert readme.read_text() == "# plain\nno markers\n"
