"""The published results reproduce their stage keys: for every experiment file, the runner plans the same jobs
with the same keys as `benchmarks/experiment.py` did before the runner became the `experiments` package
(tests/fixtures/stage_keys.json, computed by that code; both resolutions of `auto` precision). A rerun of a
published study therefore reuses its finished stages instead of training them again.

The keys hash the config files' content too: a change to configs/ changes them, rightly (the stages would
not be the same). Such a change regenerates the fixture (`python -m tests.test_experiment_keys`) and says in
its commit why the published stages are not reused.
"""

import hashlib
import json
from pathlib import Path

import pytest

from experiments.plan import plan
from experiments.spec import CONFIGS, ROOT, load_experiment

FIXTURE = Path(__file__).parent / "fixtures" / "stage_keys.json"
OUT = Path("/nonexistent-oar/runs/experiments")  # keys hash resolved paths: one fixed out folder for all
PRECISIONS = {"fp32": False, "bf16": True}  # `auto` resolves to fp32 / bf16 by whether bf16 pays


def configs_digest() -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(CONFIGS.rglob("*.yaml")))).hexdigest()


def stage_keys(stems: list[str]) -> dict[str, dict[str, str]]:
    """{experiment file stem: {job name: key}}, planned under OUT."""
    keys = {}
    for stem in stems:
        exp = load_experiment(ROOT / "experiments" / f"{stem}.yaml", [])
        jobs, _ = plan(exp, OUT / exp.name, exp.seeds)
        keys[stem] = {j.name: j.key() for j in jobs}
    return keys


@pytest.mark.parametrize("precision", sorted(PRECISIONS))
def test_every_experiment_file_keeps_the_stage_keys_of_its_published_results(precision, monkeypatch):
    fixture = json.loads(FIXTURE.read_text())
    if configs_digest() != fixture["configs_sha256"]:
        pytest.fail("configs/ changed since tests/fixtures/stage_keys.json was made: every stage key changes with it, "
                    "so published studies would train again; if that is meant, regenerate the fixture with "
                    "`python -m tests.test_experiment_keys` and say why in the commit")
    monkeypatch.setattr("models.precision.bf16_pays", lambda device: PRECISIONS[precision])
    expected = fixture[precision]
    assert stage_keys(sorted(expected)) == expected


def write_fixture() -> None:
    """Recompute the fixture from the runner as it is now (every experiments/*.yaml)."""
    import models.precision

    stems = sorted(p.stem for p in (ROOT / "experiments").glob("*.yaml"))
    result = {"configs_sha256": configs_digest()}
    for precision, pays in PRECISIONS.items():
        models.precision.bf16_pays = lambda device, pays=pays: pays
        result[precision] = stage_keys(stems)
    FIXTURE.write_text(json.dumps(result, indent=1, sort_keys=True))
    print(f"wrote {FIXTURE}")


if __name__ == "__main__":
    write_fixture()


def keys_of(exp) -> dict[str, str]:
    jobs, _ = plan(exp, OUT / exp.name, exp.seeds)
    return {j.name: j.key() for j in jobs}


def test_an_evaluation_is_keyed_by_the_arms_and_budget_it_reads_from_experiment_json():
    # The evaluation's command line names only the run folder and the model: the arms and the budget it measures
    # with come from experiment.json, so they must enter its key, or a changed arm would reuse a stale table.
    path = ROOT / "experiments" / "gap_untinted.yaml"
    base = keys_of(load_experiment(path, []))
    changed_arm = load_experiment(path, [])
    arm = next(a for a in changed_arm.arms if a.model == "absolute_gpt")
    arm.sampler["policy"] = "confidence" if arm.sampler["policy"] == "random" else "random"
    moved = {name for name, key in keys_of(changed_arm).items() if base[name] != key}
    assert moved == {"eval absolute_gpt (seed 0)"}
    more_samples = keys_of(load_experiment(path, ["budget.samples=2000"]))
    moved = {name for name, key in more_samples.items() if base[name] != key}
    assert moved == {name for name in base if name == "rows" or name.startswith("eval ")}
    longer = keys_of(load_experiment(path, ["budget.steps=3000"]))  # the AR models train longer
    assert longer["rows"] == base["rows"]  # the feature network does not read it: it is not retrained
    assert all(longer[name] != base[name] for name in base if name.startswith("eval "))


def test_a_stage_key_reads_the_config_files_its_configs_include():
    """distill.yaml includes any_order.yaml, which includes the small preset: a change to either re-keys a
    distillation, as a change to distill.yaml itself does."""
    from experiments.jobs import config_files

    names = [p.relative_to(ROOT).as_posix() for p in config_files(["configs/distill.yaml"])]
    assert names == ["configs/distill.yaml", "configs/any_order.yaml", "configs/model/ar/small.yaml"]
    both = config_files(["configs/any_order.yaml", "configs/model/ar/small.yaml"])
    assert [p.name for p in both] == ["any_order.yaml", "small.yaml"]  # each file once, in command-line order
