"""The study's choice and its curve: chosen on validation within the head budget, never on test."""

import pytest

from tests.support import bench_script


@pytest.fixture(scope="module")
def study():
    return bench_script("study")


def row(name, size=32, layers=("block3_pool",), views=1, model="dense", pooling="gap", val=0.7, test=0.7, s=10.0):
    return {"name": name, "input_size": size, "layers": list(layers), "views": views, "model": model,
            "pooling": pooling, "val_accuracy": val, "test_accuracy": test, "head_seconds": s,
            "within_budget": s <= 60, "epochs_run": 5, "best_epoch": 2,
            "extract_seconds": 100.0}


ROWS = [
    row("seed", val=0.75, test=0.75),
    row("b4", layers=("block4_pool",), val=0.77, test=0.99),          # best test: must not matter
    row("64", size=64, val=0.80, test=0.70),
    row("64-flat", size=64, pooling="flatten", val=0.85, test=0.84, s=100),   # over budget
    row("64-views", size=64, views=4, val=0.82, test=0.81, s=50),
    row("96-b5", size=96, layers=("block5_pool",), val=0.81, test=0.95, s=20),   # no gain on validation
]


def test_choice_uses_validation_within_budget_and_ignores_test(study):
    assert study.choose(ROWS)["name"] == "64-views"
    shuffled = [dict(r, test_accuracy=1 - r["test_accuracy"]) for r in reversed(ROWS)]
    assert study.choose(shuffled)["name"] == "64-views"


def test_curve_adds_one_idea_at_a_time(study):
    steps = study.curve(ROWS)
    assert [s["added"] for s in steps][0] == "seed's configuration"
    assert len(steps) == len(study.IDEAS) + 1
    within = [s["within_budget"]["name"] for s in steps]
    assert within == ["seed", "b4", "64", "64", "64-views", "64-views"]
    assert steps[3]["any_time"]["name"] == "64-flat"        # spatial heads, over budget
    vals = [s["within_budget"]["val_accuracy"] for s in steps]
    assert vals == sorted(vals)


def test_study_markdown_has_every_row_and_the_curve(study, tmp_path):
    doc = {"date": "2026-01-01", "training": {"patience": 3, "epochs": 40, "seed": 0}, "head_budget_s": 60,
           "chosen": study.choose(ROWS) | {}, "curve": study.curve(ROWS), "rows": ROWS}
    study.write(doc, tmp_path, "make study")
    text = (tmp_path / "study.md").read_text()
    assert all(f"{r['val_accuracy']:.4f}" in text for r in ROWS)
    assert "What each idea added" in text and "(over budget)" in text
