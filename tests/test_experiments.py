"""lorakit.experiments: the grid's definition, the committed results file, and one committed point re-run exactly."""

import json

import pytest

from lorakit import experiments
from lorakit.experiments import ALL_LINEAR, ATTENTION, BY_NAME, GRID, OUT, STEPS, Setting, skill_of
from lorakit.experiments_report import Spread, describe, markdown_table, summary


@pytest.fixture(scope="module")
def committed() -> dict:
    return json.loads(OUT.read_text())


def test_grid_covers_the_study():
    assert len(BY_NAME) == len(GRID), "row names are unique"
    ranks = {s.r for s in GRID if s.group == "rank"}
    assert ranks == {1, 2, 4, 8, 16, 64} and all(s.alpha == 2 * s.r for s in GRID if s.group == "rank")
    assert {s.lr for s in GRID if s.method == "lora" and s.r == 8 and s.targets == ("q_proj", "v_proj")
            and not s.dora} == {1e-3, 3e-3, 1e-2, 3e-2}
    assert {s.targets for s in GRID if s.group == "targets"} | {BY_NAME["r8"].targets} == {
        ("q_proj", "v_proj"), ATTENTION, ALL_LINEAR}
    assert any(s.dora for s in GRID) and any(s.rslora for s in GRID)
    assert {s.lr for s in GRID if s.method == "full"} == {3e-4, 1e-3, 3e-3, 1e-2, 3e-2}  # brackets its best rate
    assert any(s.method == "qlora" for s in GRID)
    assert BY_NAME["r8"] == experiments.BASE  # lorakit-train's defaults are a row of the grid


def test_scale_is_alpha_over_r_or_over_sqrt_r():
    assert Setting("a", "g", r=16, alpha=16).scale == 1.0
    assert Setting("a", "g", r=16, alpha=16, rslora=True).scale == 4.0
    assert BY_NAME["r64-rslora"].scale == BY_NAME["r64"].scale == 2.0  # 16/sqrt(64) equals 128/64


@pytest.mark.parametrize("question, skill", [("after r: sjgnirh", "after"), ("add: 28+45", "add"),
                                             ("capital of Zorbia?", "fact"), ("copy: yai", "copy")])
def test_skill_grouping_is_notebook_00s(question, skill):
    assert skill_of(question) == skill


def test_committed_results_are_complete(committed):
    assert committed["command"].startswith("python -m lorakit.experiments")
    assert {"torch", "transformers", "peft", "bitsandbytes", "python"} <= set(committed["versions"])
    assert committed["budget"]["steps"] == STEPS and committed["wall_seconds"] > 0
    assert [Setting(**{**row, "targets": tuple(row["targets"])}) for row in committed["grid"]] == GRID
    seeds = {run["seed"] for run in committed["runs"]}
    assert len(seeds) >= 3, "every comparison rests on several seeds"
    assert sorted((r["name"], r["seed"]) for r in committed["runs"]) == sorted(
        (s.name, seed) for s in GRID for seed in seeds)
    for run in committed["runs"]:
        assert run["steps"] == STEPS and 0 <= run["accuracy"] <= 1 and run["peak_step_bytes"] > 0
        assert set(run["skills"]) == set(committed["base_skills"]) and run["trainable_params"] > 0
    assert committed["base_skills"]["all"] == pytest.approx(0.7425)  # notebook 00: 74.2% of 400 questions


def test_summary_gives_spread_over_seeds(committed):
    rows = summary(committed)
    assert list(rows) == [s.name for s in GRID]
    row = rows["r8"]
    assert len(row.seeds) >= 3 and row.accuracy.lo <= row.accuracy.mean <= row.accuracy.hi
    assert "±" in markdown_table(rows, ["r8"]) and describe(row.setting) == "LoRA r=8 α=16 q,v lr 3e-3"
    assert Spread([0.5, 0.7]).pct() == "60.0% ± 14.1 (50–70)"


def test_base_skills_match_the_committed_ones(committed):
    assert experiments.base_skills() == committed["base_skills"]


@pytest.mark.slow
def test_a_committed_point_reproduces(committed):
    """The cheapest row (r = 1), seed 0, trained again here: the same accuracy, skills, loss and counts."""
    stored = next(r for r in committed["runs"] if r["name"] == "r1" and r["seed"] == 0)
    again = experiments.run_point(BY_NAME["r1"], seed=0, steps=committed["budget"]["steps"])
    for key in ("accuracy", "skills", "train_loss", "trainable_params", "peak_step_bytes"):
        assert again[key] == stored[key], key


def test_pareto_check_rejects_a_front_that_drops_ties(capsys):
    from lorakit.exercises import check_pareto_front

    def ties_dominate(points):  # an equal point counts as better, so both of a tied pair drop out
        return sorted(n for n, (a, k) in points.items()
                      if not any(a2 >= a and k2 >= k and m != n for m, (a2, k2) in points.items()))

    assert check_pareto_front(ties_dominate) is False
    assert "an exact tie keeps both: expected ['x', 'y'], got []" in capsys.readouterr().out


def test_differences_compare_results_but_not_seconds(committed):
    from lorakit.experiments_report import differences

    again = {"runs": [dict(run, train_seconds=run["train_seconds"] + 1) for run in committed["runs"][:3]]}
    assert differences(committed, again) == []
    again["runs"][0] = dict(again["runs"][0], accuracy=-1.0)
    assert differences(committed, again) == [f"{again['runs'][0]['name']} seed {again['runs'][0]['seed']} accuracy: "
                                             f"{committed['runs'][0]['accuracy']} -> -1.0"]
