"""The comparison shorthand: `compare_orders.py` flags stand for an experiment file of the runner plus
overrides (the runs themselves are tested in tests/test_experiment.py)."""

from experiments import compare_orders


def table_rows(markdown: str) -> dict[str, dict[str, str]]:
    """The results table as {arm: {column: cell}}."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def test_shorthand_stands_for_an_experiment_file_with_overrides():
    argv = compare_orders.runner_argv(["--quick", "--data", "fashion_mnist", "--seeds", "3", "--set", "budget.steps=9"])
    assert argv[0].endswith("experiments/quick.yaml")
    sets = argv[argv.index("--set") + 1:]
    assert sets == ["name=quick_fashion_mnist", "data=fashion_mnist", "seeds=[0,1,2]", "budget.steps=9"]
    assert compare_orders.runner_argv([])[0].endswith("standard.yaml")
