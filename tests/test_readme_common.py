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


def test_mismatched_markers_are_refused_and_nothing_is_written(tmp_path):
    import pytest

    readme = tmp_path / "README.md"
    write_results(tmp_path, "exp_a", False, [], {"exp_a.gen": "block", "exp_a.g": "other"})
    for broken in ("<!-- generated: exp_a.gen -->\nprose\n<!-- /generated: exp_a.ge -->\nmore prose\n",  # mistyped close
                   "<!-- generated: exp_a.g -->\nprose\n<!-- generated: exp_a.gen -->\n<!-- /generated: exp_a.gen -->\n",
                   "<!-- generated: exp_a.gen -->\nprose never closed\n"):
        readme.write_text(broken)
        with pytest.raises(ValueError, match="README.md"):
            render_readme(tmp_path, readme, ["exp_a"])
        assert readme.read_text() == broken
    readme.write_text("<!-- generated: exp_a.g -->\nold\n<!-- /generated: exp_a.g -->\n"
                      "<!-- generated: exp_a.missing -->\n<!-- /generated: exp_a.missing -->\n")
    render_readme(tmp_path, readme, ["exp_a"])  # a key that is a prefix of another is its own block
    text = readme.read_text()
    assert "<!-- generated: exp_a.g -->\nother\n<!-- /generated: exp_a.g -->" in text
    assert "(not produced by the last full run of `python experiments/exp_a.py`)" in text


def test_a_marker_that_would_not_be_filled_is_refused(tmp_path):
    import pytest

    readme = tmp_path / "README.md"
    write_results(tmp_path, "exp_a", False, [], {"exp_a.gen": "block"})
    for broken in ("<!-- generated: exp_a.gen --> text on the marker's line\nold\n<!-- /generated: exp_a.gen -->\n",
                   "<!-- generated: exp_a.gen -->\nold\n<!-- /generated: exp_a.gen  -->\n",
                   "<!-- generated: exp_a.gen (a > b) -->\nold\n<!-- /generated: exp_a.gen -->\n"):
        readme.write_text(broken)
        with pytest.raises(ValueError, match=r"README.md:[13]: malformed generated-block marker"):
            render_readme(tmp_path, readme, ["exp_a"])
        assert readme.read_text() == broken


def test_the_repository_readme_has_well_formed_markers_and_the_headline():
    from readme_common import check_blocks

    readme = Path(__file__).resolve().parent.parent / "README.md"
    text = readme.read_text()
    check_blocks(text, readme)
    assert HEADLINE_BEGIN in text and HEADLINE_END in text


def test_a_readme_without_markers_is_left_alone(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# plain\nno markers\n")
    write_results(tmp_path, "exp_a", False, [("x", "1")], {"exp_a.gen": "block"})
    render_readme(tmp_path, readme, ["exp_a"])
    assert readme.read_text() == "# plain\nno markers\n"


def test_why_missed_reads_the_kept_step_the_val_ss_closest_to_50_and_the_smallest_test_type():
    from targets_common import why_missed

    def val(step, overall, gender, religion, drop):
        return {"step": step, "ss": {"overall": overall, "gender": gender, "religion": religion},
                "lms": {"overall": 80.0}, "worst_gap": max(abs(gender - 50), abs(religion - 50)), "lms_drop": drop}

    # the closest to 50 is 49.0 (step 50), not the lowest (47.0, step 75)
    records = [val(0, 58.0, 60.0, 62.0, 0.0), val(25, 53.0, 55.0, 44.0, 0.5), val(50, 49.0, 58.0, 59.0, 0.5),
               val(75, 47.0, 57.0, 40.0, 0.5)]
    text = why_missed({"run A": records, "run B": []}, {"run A": 25}, {"run A": 2.0, "run B": 3.0}, {"run A": 56.5}, (58.0, 60.1),
                      {"gender": (2, 86), "religion": (1, 50)})
    assert "run A: kept step 25, val SS 53.00 with religion at 44.0 (below 46: religion 44.0), test SS 56.50" in text
    assert "val SS closest to 50: 49.00 at step 50 (within 50 ± 2, not kept: a bias type's gap was larger there)" in text
    assert "within 2 LMS points of step 0" in text and "SS 58.00 on val and 60.10 on test" in text
    assert "run B" not in text and "religion, has 1 target term and 50 clusters, so one cluster moves its SS by 2.0" in text
    far = why_missed({"run A": records[:2]}, {"run A": 25}, {"run A": 2.0}, {}, (58.0, 60.1), {"gender": (2, 40)})
    assert "closest to 50: 53.00 at step 25 (outside 50 ± 2)" in far and "gender, has 2 target terms and 40 clusters." in far
    assert why_missed({}, {}, {}, {}, (58.0, 60.1), {}) == ""


def test_why_missed_names_the_reason_the_closest_evaluation_was_not_kept():
    from targets_common import why_missed

    def val(step, overall, gap, drop):
        return {"step": step, "ss": {"overall": overall, "gender": 50 + gap}, "lms": {"overall": 80.0},
                "worst_gap": gap, "lms_drop": drop}

    def reason(records, kept, allowance=2.0):
        text = why_missed({"A": records}, {"A": kept}, {"A": allowance}, {}, (58.0, 60.1), {})
        return text.split("within 50 ± 2, not kept: ")[1].split(")")[0]

    kept = val(25, 53.0, 5.0, 0.5)
    assert reason([kept, val(50, 49.0, 4.0, 2.5)], 25) == "its LMS drop 2.50 exceeded the 2-point allowance"
    assert reason([kept, val(50, 49.0, 6.0, 0.5)], 25) == "a bias type's gap was larger there"
    assert reason([kept, val(50, 49.0, 6.0, 2.5)], 25) == ("its LMS drop 2.50 exceeded the 2-point allowance and "
                                                           "a bias type's gap was larger there")
    assert reason([kept, val(50, 49.0, 5.0, 0.5)], 25) == "an earlier evaluation with the same worst-type gap was kept"
    both = why_missed({"A": [kept], "B": [val(0, 58.0, 9.0, 0.0)]}, {"A": 25, "B": 0}, {"A": 2.0, "B": 1.5}, {},
                      (58.0, 60.1), {})
    assert "among those within the run's LMS allowance of step 0 (A 2 points, B 1.5 points)" in both


def test_the_ss_paragraph_needs_a_missed_ss_target_and_the_allowance_is_the_recorded_one():
    from ram_debias_common import recorded_max_lms_drop
    from targets_common import ss_targets_missed

    from amendlm.bias.compare import TARGET_NAMES
    from amendlm.ram.preference import PairsConfig

    def checks(*passed):
        return [{"name": name, "passed": p} for name, p in zip(TARGET_NAMES, passed)]

    assert not ss_targets_missed({"A": checks(True, True, False, False, False, True), "B": checks(None, None, True, True, True, None)})
    for missed in range(6):
        passed = [i != missed for i in range(6)]
        assert ss_targets_missed({"A": checks(*passed)}) == (missed in (0, 1, 5))
    assert recorded_max_lms_drop({"pairs": {"max_lms_drop": 3.5}}) == 3.5
    assert recorded_max_lms_drop({"pairs": None}) == recorded_max_lms_drop({}) == PairsConfig.max_lms_drop


def test_the_xsum_verdict_reads_the_targets_and_names_what_is_not_run():
    from ram_xsum_common import verdict

    targets = [{"against": "aligner", "difference": 2.5, "low": 1.5, "high": 3.6, "target": 1.5, "met": True},
               {"against": "proposal", "difference": 0.02, "low": -0.8, "high": 0.9, "target": 2.0, "met": False}]
    text = verdict({"greedy": {"greedy": True, "best_mode": "mds-te4", "targets": targets}}, "python x.py")
    assert ("- Greedy decoding, best RAM mode chosen on val `mds-te4`: beats its aligner alone (+2.50 [+1.50, +3.60] "
            "ROUGE-L; target +1.5: met); does not beat the proposal alone (+0.02 [-0.80, +0.90] ROUGE-L; target +2: missed).") in text
    assert "- Sampled decoding: not run yet; `python x.py` computes it." in text
    pending = verdict({"greedy": {"greedy": True, "best_mode": None, "targets": []}}, "python x.py")
    assert "Greedy decoding: its best mode is not chosen yet (val step pending)" in pending


def test_the_recommended_unlearning_row_explains_a_missed_ss_target_from_its_val_evaluations():
    from unlearn_ablation import why_chosen_misses

    from amendlm.bias.compare import TARGET_NAMES

    def record(step, gender, religion, lms):
        ss = {"gender": gender, "religion": religion, "overall": (gender + religion) / 2}
        return {"step": step, "ss": ss, "lms": {"overall": lms}, "worst_gap": max(abs(gender - 50), abs(religion - 50))}

    evals = {"r": [record(0, 60.0, 62.0, 80.0), record(20, 54.0, 58.0, 79.5), record(40, 41.0, 57.0, 79.0)]}
    choices = {"r": {"step": 20}}
    rows = [{"run": "base (before)", "ss": 60.1}, {"run": "r", "ss": 57.0}]
    base = {"benchmarks": {"stereoset": {"scores": {"overall": {"overall": {}, "religion": {"n_targets": 1, "n_clusters": 50}}}}}}
    missed = {"r": [{"name": n, "passed": i != 0} for i, n in enumerate(TARGET_NAMES)]}
    met = {"r": [{"name": n, "passed": True} for n in TARGET_NAMES]}
    text = why_chosen_misses("r", evals, choices, {"r": ("gap_within_lms", 2.0)}, missed, rows, base)
    assert "| 40 | 41.00 | 57.00 | 49.00 | 79.00 |" in text  # step, gender, religion, overall, val LMS
    assert "r: kept step 20, val SS 56.00 with religion at 58.0, test SS 57.00" in text
    assert "val SS closest to 50: 49.00 at step 40 (within 50 ± 2, not kept: a bias type's gap was larger there)" in text
    assert "scores SS 61.00 on val and 60.10 on test" in text and "1 target term and 50 clusters" in text
    assert why_chosen_misses("r", evals, choices, {"r": ("gap_within_lms", 2.0)}, met, rows, base) == ""
    assert why_chosen_misses(None, evals, choices, {}, missed, rows, base) == ""
    other_rule = why_chosen_misses("r", evals, choices, {"r": ("worst_gap", 2.0)}, missed, rows, base)
    assert "| 40 |" in other_rule and "Why the SS targets" not in other_rule  # the paragraph explains gap_within_lms only
