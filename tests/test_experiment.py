"""The experiment runner: stage keys tie every stage to its inputs, interrupted fits resume, and the smoke
experiment runs end to end into a report (slow)."""

import json
from pathlib import Path

import pytest

from experiments import evaluate, jobs, plan, runner, scheduler
from experiments.spec import ROOT, load_experiment, resolve_precisions
from tests.conftest import TOKENIZER_CKPT
from tests.test_compare_orders import table_rows

SMOKE = ROOT / "experiments" / "smoke.yaml"


def jobs_of(tmp_path: Path, *overrides: str) -> dict[str, jobs.Job]:
    exp = load_experiment(SMOKE, list(overrides))
    planned, _ = plan.plan(exp, tmp_path / exp.name, exp.seeds)
    return {j.name: j for j in planned}


def test_a_changed_model_changes_its_own_key_and_its_dependents_only(tmp_path):
    before = jobs_of(tmp_path)
    after = jobs_of(tmp_path, "models.any_order.overrides={model.init_args.curriculum_steps: 3}")
    changed = {name for name in before if before[name].key() != after[name].key()}
    assert {"any_order (seed 0)", "distill (seed 0)"} <= changed
    assert any(n.startswith("orders any_order") for n in changed)
    assert "eval any_order (seed 0)" in changed and "eval distill@2 (seed 0)" in changed
    assert not changed & {"tokenizer", "raster (seed 0)", "eval raster (seed 0)", "rows"}
    other_tokenizer = jobs_of(tmp_path, "budget.tokenizer_steps=5")
    assert all(other_tokenizer[n].key() != before[n].key() for n in before)  # everything hangs on the tokenizer


def test_an_interrupted_fit_resumes_from_its_last_checkpoint(tmp_path):
    job = jobs_of(tmp_path)["raster (seed 0)"]
    first = job.command()  # writes done.json (unfinished) for this key
    assert "--ckpt_path" not in first
    (job.folder / "checkpoints").mkdir(parents=True)
    (job.folder / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    assert job.command()[-2:] == ["--ckpt_path", str(job.folder / "checkpoints" / "last.ckpt")]
    other = jobs_of(tmp_path, "budget.steps=5")["raster (seed 0)"]  # other settings: from scratch
    assert "--ckpt_path" not in other.command() and not (job.folder / "checkpoints").exists()
    kept = job.folder.with_name(f"{job.folder.name}.replaced-{job.key()}") / "checkpoints" / "last.ckpt"
    assert kept.read_bytes() == b"weights"  # the old run is set aside, never deleted


def test_train_processes_run_each_fit_as_cpu_ddp_with_the_global_batch_unchanged(tmp_path):
    single, ddp = jobs_of(tmp_path), jobs_of(tmp_path, "budget.train_processes=2")
    for name in ("raster (seed 0)", "any_order (seed 0)", "distill (seed 0)"):
        args = dict(zip(ddp[name].argv, ddp[name].argv[1:], strict=False))
        trainer = (args["--trainer.strategy"], args["--trainer.accelerator"], args["--trainer.devices"])
        assert trainer == ("ddp", "cpu", "2")
        assert args["--data.init_args.batch_size"] == "8" and ddp[name].slots == 2  # smoke's batch 16, split in two
        assert ddp[name].key() != single[name].key() and "--trainer.strategy" not in single[name].argv
    assert ddp["tokenizer"].key() == single["tokenizer"].key()  # the tokenizer stays one process
    own = jobs_of(tmp_path, "models.raster.processes=2")
    assert own["raster (seed 0)"].slots == 2 and own["any_order (seed 0)"].slots == 1
    with pytest.raises(ValueError, match="does not split over 3 processes: set budget.train_processes"):
        jobs_of(tmp_path, "budget.train_processes=3")


@pytest.mark.parametrize("pays", [True, False])
def test_auto_precision_becomes_bf16_only_where_it_pays_before_the_job_keys(pays, tmp_path, monkeypatch):
    """`auto` is resolved when the experiment loads: bf16 on AMX-class CPUs, fp32 where bf16 is emulated, and
    the fit's command line (so its key) carries the concrete precision, the same as writing it out."""
    monkeypatch.setattr("models.precision.bf16_pays", lambda device: pays)
    auto = ("models.raster.overrides={trainer.precision: auto}", "budget.sample_precision=auto")
    exp = load_experiment(SMOKE, list(auto))
    train, sample = ("bf16-mixed", "bf16") if pays else ("32-true", "fp32")
    assert exp.models["raster"].overrides["trainer.precision"] == train
    assert exp.budget.sample_precision == sample
    exp.arms[0].sampler["precision"] = "auto"
    assert resolve_precisions(exp).arms[0].sampler["precision"] == sample
    written = jobs_of(tmp_path, f"models.raster.overrides={{trainer.precision: {train}}}")["raster (seed 0)"]
    resolved = jobs_of(tmp_path, auto[0])["raster (seed 0)"]
    assert resolved.key() == written.key() and f"--trainer.precision={train}" in " ".join(
        f"{a}={b}" for a, b in zip(resolved.argv, resolved.argv[1:], strict=False))


def test_the_real_image_rows_run_right_after_the_tokenizer(tmp_path):
    names = list(jobs_of(tmp_path))
    assert names[:2] == ["tokenizer", "rows"] and names[-1].startswith("eval ")


def test_a_stage_finished_meanwhile_by_another_invocation_is_reused_not_rerun(tmp_path):
    script = tmp_path / "stage.py"  # writes its product; the first stage also finishes the second one's
    script.write_text("import json, pathlib, sys\n"
                      "for folder in sys.argv[1:]:\n"
                      "    f = pathlib.Path(folder); f.mkdir(parents=True, exist_ok=True)\n"
                      "    (f / 'product').write_text('made')\n"
                      "    (f / 'ran').touch() if folder == sys.argv[1] else None\n")
    second = jobs.Job("second", tmp_path / "second", [], tmp_path / "second" / "product", program=(str(script),))
    second.argv = [str(second.folder)]
    first = jobs.Job("first", tmp_path / "first", [str(tmp_path / "first"), str(second.folder)],
                           tmp_path / "first" / "product", program=(str(script),))
    second.deps = [first]
    real_mark = first.mark_finished

    def mark_both(seconds: float) -> None:  # the other invocation records the second stage as finished
        real_mark(seconds)
        second.mark_finished(0.0)

    first.mark_finished = mark_both
    scheduler.run_jobs([first, second], max_parallel=1)
    assert (first.folder / "ran").exists() and not (second.folder / "ran").exists()


def test_a_folder_reached_through_a_symlink_keeps_its_stage_keys(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    direct, linked = jobs_of(tmp_path / "real"), jobs_of(tmp_path / "link")
    assert all(direct[n].key() == linked[n].key() for n in direct)
    assert linked["raster (seed 0)"].argv != direct["raster (seed 0)"].argv  # the paths are spelt differently


@pytest.mark.slow
def test_smoke_experiment_runs_into_a_report_and_reuses_every_stage(tmp_path, capsys):
    runner.main([str(SMOKE), "--out", str(tmp_path)])
    run = tmp_path / "smoke"
    rows = table_rows((run / "report.md").read_text())
    arms = ["raster AR", "any-order AR, random order", "any-order AR, confidence order",
            "OAR distilled, confidence order", "real images (reference)", "tokenizer reconstruction (ceiling)"]
    assert list(rows) == arms
    assert all(float(rows[a]["FID ↓"]) >= 0 for a in arms)
    assert rows["OAR distilled, confidence order"]["train steps"] == "4 + 2"
    assert (run / "samples.png").stat().st_size > 0 and (run / "curves.png").stat().st_size > 0
    report = json.loads((run / "report.json").read_text())
    assert {"raster AR@2", "raster AR@4", "OAR distilled, confidence order@2"} <= set(report["curves"])
    capsys.readouterr()
    runner.main([str(SMOKE), "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "running" not in printed and printed.count("reused") == 14
    own = float(rows["any-order AR, random order"]["NLL own order"])
    (run / "seed0" / "eval" / "any_order.json").write_text(json.dumps(  # as an older version wrote it
        {"metrics": {a: {k: v for k, v in m.items() if k != "nll_own"} for a, m in
                     json.loads((run / "seed0" / "eval" / "any_order.json").read_text())["metrics"].items()}}))
    evaluate.main([str(run), "nll", "0", "any_order"])
    runner.main([str(SMOKE), "--out", str(tmp_path), "--only", "report"])
    again = table_rows((run / "report.md").read_text())
    assert float(again["any-order AR, confidence order"]["NLL own order"]) == pytest.approx(own, abs=2e-3)
    kept = (run / "report.md").read_text()
    with pytest.raises(SystemExit, match="no arm .* has an evaluation for seeds \\[7\\]"):  # a seed that never ran
        runner.main([str(SMOKE), "--out", str(tmp_path), "--only", "report", "--seeds", "7"])
    assert (run / "report.md").read_text() == kept


@pytest.mark.slow
def test_untinted_unconditional_variant_gets_the_analyser_columns_but_no_class_accuracy(tmp_path):
    runner.main([str(SMOKE), "--out", str(tmp_path), "--set", "data=synthetic_untinted", "name=untinted",
                     "budget.keep_every=0"])
    rows = table_rows((tmp_path / "untinted" / "report.md").read_text())
    assert "class acc. ↑" not in rows["real images (reference)"]
    for column in ("consistency ↑", "sun found", "clouds found"):
        float(rows["raster AR"][column])
    assert float(rows["real images (reference)"]["consistency ↑"]) == 1.0
    report = json.loads((tmp_path / "untinted" / "report.json").read_text())
    assert report["rows"]["feature_info"]["label_head"] is None


def test_a_given_tokenizer_replaces_the_tokenizer_stage(tmp_path):
    tokenizer = tmp_path / "tok.ckpt"
    tokenizer.write_bytes(b"one tokenizer")
    jobs = jobs_of(tmp_path, f"tokenizer={tokenizer}")
    assert jobs["tokenizer"].finished() and jobs["tokenizer"].product == tokenizer
    before = jobs["raster (seed 0)"].key()
    tokenizer.write_bytes(b"another tokenizer")  # other contents: every stage after it changes
    assert jobs_of(tmp_path, f"tokenizer={tokenizer}")["raster (seed 0)"].key() != before


def test_the_evaluation_reads_the_data_the_stages_trained_on(tokenizer_run, tmp_path):
    """budget.train_images / val_images size the stages' data; the evaluation must build the same split."""
    from experiments.evaluate import datamodule

    exp = load_experiment(SMOKE, ["budget.train_images=40", "budget.val_images=12"])
    stage = plan.data_overrides(exp, tmp_path)
    dm = datamodule(exp, tmp_path, tokenizer_run / TOKENIZER_CKPT)
    train, val = dm.split_indices()
    assert len(dm.source) == stage["data.init_args.source.init_args.num_images"] == 52
    assert (len(train), len(val)) == (40, 12)


def test_the_report_merges_columns_measured_again_into_every_arm_of_the_model(tmp_path):
    from experiments.report.evals import load_evals

    folder = tmp_path / "seed0" / "eval"
    folder.mkdir(parents=True)
    (folder / "m.json").write_text(json.dumps({"metrics": {"a": {"fid": 1.0}, "b": {"fid": 2.0}}, "step": None}))
    (folder / "m@5.json").write_text(json.dumps({"metrics": {"a": {"fid": 3.0}}, "step": 5}))
    (folder / "m.nll.json").write_text(json.dumps({"adds": {"a": {"nll_own": 4.0}, "b": {"nll_own": 4.0}},
                                                   "step": None}))
    final, steps = load_evals(tmp_path, [0])
    assert final == {"a": [{"fid": 1.0, "nll_own": 4.0}], "b": [{"fid": 2.0, "nll_own": 4.0}]}
    assert steps == {("a", 5): [{"fid": 3.0}]}


def test_paired_differences_use_the_seeds_both_arms_have(tmp_path):
    from experiments.report.evals import load_evals, paired_differences
    from experiments.report.tables import paired_table

    values = {0: ({"fid": 10.0, "consistency": 0.9}, {"fid": 12.0, "consistency": 0.8}),
              1: ({"fid": 11.0, "consistency": 0.9}, {"fid": 15.0, "consistency": 0.6}),
              2: ({"fid": 99.0, "consistency": 0.0}, None)}  # b was not evaluated in seed 2
    for seed, (a, b) in values.items():
        (tmp_path / f"seed{seed}" / "eval").mkdir(parents=True)
        metrics = {"a": a, **({"b": b} if b else {})}
        (tmp_path / f"seed{seed}" / "eval" / "m.json").write_text(json.dumps({"metrics": metrics, "step": None}))
    by_seed = {}
    load_evals(tmp_path, [0, 1, 2], by_seed)
    [pair] = paired_differences(by_seed, [["a", "b"], ["a", "not evaluated"]])
    assert pair["seeds"] == [0, 1] and pair["diffs"]["fid"] == [-2.0, -4.0]
    assert pair["diffs"]["consistency"] == pytest.approx([0.1, 0.3]) and "nll_own" not in pair["diffs"]
    from experiments.report.write import partial_note

    assert "a (seeds" not in " ".join(partial_note(by_seed, ["a", "b"], [0, 1, 2]))
    assert "b (seeds 0, 1)" in partial_note(by_seed, ["a", "b"], [0, 1, 2])[0]
    assert partial_note(by_seed, ["a"], [0, 1, 2]) == []
    row = paired_table([pair]).splitlines()[-1]
    assert row.startswith("| a − b | 0, 1 | -3.00 ± 1.41 (-2.00, -4.00) | +0.200 ± 0.141 (+0.100, +0.300) | –")


def test_the_report_keeps_seeds_published_by_an_earlier_session(tmp_path):
    from experiments.report import write_report

    root, published = tmp_path / "run", tmp_path / "published"
    exp = {"name": "e", "seeds": [1], "budget": {"samples": 10, "steps": 4}, "data": "synthetic", "preset": "tiny",
           "models": {"m": {"stage": "any_order"}}, "arms": [{"name": "a", "model": "m"}], "paired": []}
    rows = {"rows": {"real images (reference)": {"fid": 2.0}}, "feature_name": "f"}
    (root / "seed1" / "eval").mkdir(parents=True)
    (root / "experiment.json").write_text(json.dumps(exp))
    (root / "rows.json").write_text(json.dumps(rows))
    (root / "seed1" / "eval" / "m.json").write_text(json.dumps({"metrics": {"a": {"fid": 5.0}}, "step": None}))
    (published / "evals" / "seed0").mkdir(parents=True)
    (published / "evals" / "seed0" / "m.json").write_text(json.dumps({"metrics": {"a": {"fid": 3.0}}, "step": None}))
    (published / "report.json").write_text(json.dumps({"rows": rows, "stage_times": {"seed0/m": 7.0}}))
    result = write_report(root, "cmd", published)
    assert result["experiment"]["seeds"] == [0, 1] and result["per_seed"]["a"] == [{"fid": 3.0}, {"fid": 5.0}]
    assert result["stage_times"] == {"seed0/m": 7.0}
    assert (published / "evals" / "seed1" / "m.json").is_file()  # the next session finds this seed too
    assert "moved since" not in (published / "report.md").read_text()
    rows["rows"]["real images (reference)"]["fid"] = 2.5  # a feature network retrained differently
    (root / "rows.json").write_text(json.dumps(rows))
    write_report(root, "cmd", published)
    assert "FID 2.000 before, 2.500 now" in (published / "report.md").read_text()


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_experiment_file_plans_its_stages_and_arms(path, tmp_path):
    """Each shipped experiment file parses, names models its arms use, and plans one fit per model and seed."""
    exp = load_experiment(path, [])
    planned, _ = plan.plan(exp, tmp_path / exp.name, exp.seeds)
    names = {j.name for j in planned}
    assert {a.model for a in exp.arms} <= set(exp.models)
    assert {name for pair in exp.paired for name in pair} <= {a.name for a in exp.arms}
    assert all(f"{m} (seed {s})" in names for m in exp.models for s in exp.seeds)
