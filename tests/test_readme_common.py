"""The generated parts of README.md (experiments/readme_common.py) and the data-driven text they carry."""

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


def test_why_missed_reads_the_lowest_val_ss_the_kept_steps_worst_type_and_the_smallest_test_type():
    from ram_debias_common import why_missed

    def val(step, overall, gender, religion, drop):
        return {"step": step, "ss": {"overall": overall, "gender": gender, "religion": religion},
                "lms": {"overall": 80.0}, "worst_gap": max(abs(gender - 50), abs(religion - 50)), "lms_drop": drop}

    records = [val(0, 58.0, 60.0, 62.0, 0.0), val(25, 53.0, 55.0, 44.0, 0.5), val(50, 51.0, 52.0, 58.0, 2.5)]
    text = why_missed({"run A": records, "run B": []}, {"run A": 25}, 2.0, {"gender": 86, "religion": 50})
    assert "run A: lowest val SS 51.00 (step 50, LMS drop 2.50, above the allowed 2)" in text
    assert "at the kept step 25 the worst val type is religion (SS 44.0), overall val SS 53.00" in text
    assert "run B" not in text and "The smallest test type, religion, has 50 clusters" in text and "2.0 points" in text
    assert why_missed({}, {}, 2.0, {}) == ""
