"""The whole experiment file checked before anything is planned or trained: a fault found after an hour of
training costs the hour. Each fault is one line naming the key to fix."""

from experiments.spec import AR_STAGES, CONFIGS, Experiment, ExperimentError


def check_experiment(exp: Experiment) -> None:
    """Raise `ExperimentError` at the first fault: files, seeds, budget, models, arms, pairs, pinned artefacts."""
    check_files(exp)
    check_budget(exp)
    check_models(exp)
    check_arms(exp)
    for what, pinned in (("tokenizer", exp.tokenizer), ("feature_net", exp.feature_net)):
        if pinned is not None:
            pinned.verify(what)


def check_files(exp: Experiment) -> None:
    if not (CONFIGS / "data" / f"{exp.data}.yaml").is_file():
        names = sorted(p.stem for p in (CONFIGS / "data").glob("*.yaml"))
        raise ExperimentError(f"data: no configs/data/{exp.data}.yaml; choose one of {names}")
    if not (CONFIGS / "model" / "ar" / f"{exp.preset}.yaml").is_file():
        names = sorted(p.stem for p in (CONFIGS / "model" / "ar").glob("*.yaml"))
        raise ExperimentError(f"preset: no configs/model/ar/{exp.preset}.yaml; choose one of {names}")
    if not exp.seeds or not all(isinstance(s, int) for s in exp.seeds):
        raise ExperimentError(f"seeds: a list of whole numbers, got {exp.seeds!r}")


def check_budget(exp: Experiment) -> None:
    b = exp.budget
    if exp.tokenizer is None and not b.tokenizer_steps:
        raise ExperimentError("budget.tokenizer_steps: needed to train the tokenizer (or pin one with `tokenizer:`)")
    if (b.train_images is None) != (b.val_images is None):
        raise ExperimentError("budget.train_images and budget.val_images: give both (the split sizes) or neither")
    if b.keep_every and not b.curve_samples:
        raise ExperimentError("budget.curve_samples: needed with keep_every (samples per kept checkpoint)")
    for key in ("steps", "samples", "train_processes", "extract_processes", "nll_images", "sample_batch"):
        value = getattr(b, key)
        if not isinstance(value, int) or value < 1:
            raise ExperimentError(f"budget.{key}: a whole number >= 1, got {value!r}")


def check_models(exp: Experiment) -> None:
    if not exp.models:
        raise ExperimentError("models: name at least one model to train")
    seen = []
    for name, spec in exp.models.items():
        where = f"models.{name}"
        if spec.stage not in AR_STAGES:
            raise ExperimentError(f"{where}.stage: {spec.stage!r} is not one of {', '.join(AR_STAGES)}")
        if spec.stage == "distill":
            if spec.init_from not in seen:
                raise ExperimentError(f"{where}.init_from: name a model listed before it (one of {seen}), "
                                      f"got {spec.init_from!r}")
            if spec.steps is None and exp.budget.finetune_steps is None:
                raise ExperimentError(f"budget.finetune_steps (or {where}.steps): the steps of distilled model {name}")
        elif spec.init_from is not None or spec.extract:
            raise ExperimentError(f"{where}: init_from and extract are for stage distill, not {spec.stage}")
        if not all(isinstance(k, str) for k in spec.overrides):
            raise ExperimentError(f"{where}.overrides: dotted CLI keys (model.init_args.x: value)")
        seen.append(name)


def check_arms(exp: Experiment) -> None:
    from models.sampling import AUTO

    names = [a.name for a in exp.arms]
    if len(set(names)) != len(names):
        raise ExperimentError(f"arms: names must differ, got {names}")
    for arm in exp.arms:
        where = f"arm {arm.name!r}"
        if arm.model not in exp.models:
            raise ExperimentError(f"{where}: model {arm.model!r} is not one of models: {list(exp.models)}")
        if arm.sampler.get("choice_temperature") == AUTO:
            raise ExperimentError(f"{where}: choice_temperature auto is for `run.py predict`; an arm names its T "
                                  "(0 = greedy): fix the arm's sampler in the experiment file")
        try:
            exp.arm_settings(arm)
        except (TypeError, ValueError) as err:
            raise ExperimentError(f"{where}: sampler: {err}") from None
    for pair in exp.paired:
        if len(pair) != 2 or not set(pair) <= set(names):
            raise ExperimentError(f"paired: {pair!r} must name two arms of this file ({names})")
