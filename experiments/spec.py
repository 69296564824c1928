"""An experiment file, typed: the data, the size preset, a budget, the trained models, the evaluated arms and the
shared artefacts it pins. Every default is stated here, once; `load_experiment` checks the whole file (names,
keys, sampler settings, pinned files) before the runner plans, let alone trains, anything.

    name: standard            # default: the file's stem; the run folder is runs/experiments/<name>
    data: synthetic           # configs/data/<data>.yaml
    preset: small             # configs/model/{tokenizer,ar}/<preset>.yaml
    seeds: [0]
    budget: {tokenizer_steps: 1500, steps: 4000, finetune_steps: 500, samples: 1000, ...}   (`Budget`)
    models:
      raster:    {stage: raster}
      any_order: {stage: any_order, overrides: {model.init_args.curriculum_steps: 1000}}
      distill:   {stage: distill, init_from: any_order, extract: {score: true_prob}}
    arms:
      - {name: raster AR, model: raster, sampler: {policy: raster}}
    paired: [[arm a, arm b]]  # per-seed differences in the report
    tokenizer: {path: results/standard_seeds/artefacts/tokenizer.ckpt, sha256: "3f2a..."}   (optional: `Pinned`)
    feature_net: {path: results/standard_seeds/artefacts/feature_net.pt, sha256: "9c1d..."}  (optional)

`auto` (as `budget.sample_precision`, an arm's `sampler.precision` or a model's `trainer.precision` override) is
resolved when the file is loaded: bf16 (`bf16-mixed` for training) where this machine's matmuls have native bf16
(AMX, AVX512-BF16, bf16 tensor cores), else fp32, where emulated bf16 is many times slower. The resolved value
is what `experiment.json`, the stage keys and the report record.
"""

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
AR_STAGES = ("raster", "any_order", "distill")  # what a model may train (the tokenizer is the runner's own stage)


class ExperimentError(ValueError):
    """A fault of the experiment file: one line that names the fix."""


@dataclass
class Pinned:
    """A shared artefact given by content (a tokenizer checkpoint, a feature network): used instead of training
    one, after its sha256 is checked. `path` is relative to the repository unless absolute; published by
    `python -m experiments FILE --publish results/<name> --artefacts` (results/<name>/artefacts/)."""

    path: str
    sha256: str | None = None  # None: the file is taken as it is (no check; its content still keys the stages)

    def file(self) -> Path:
        return ROOT / self.path  # an absolute path stays as it is

    def verify(self, what: str) -> Path:
        """The file, after checking it exists and holds `sha256`; one line naming the fix otherwise."""
        from fileio import file_sha256

        if self.sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", str(self.sha256)):
            raise ExperimentError(f"{what}.sha256: 64 hex digits, in quotes (YAML reads some as numbers), "
                                  f"got {self.sha256!r}")
        path = self.file()
        fix = (f"copy it from the machine that made it (`python -m experiments <file> --publish results/<name> "
               f"--artefacts` writes it), or fix `{what}:` in the experiment file")
        if not path.is_file():
            raise ExperimentError(f"{what} {path} not found: {fix}")
        if self.sha256 is not None and file_sha256(path) != self.sha256:
            raise ExperimentError(f"{what} {path} has sha256 {file_sha256(path)}, not the pinned {self.sha256}: "
                                  f"it is another file; {fix}")
        return path


@dataclass
class Budget:
    """How long every stage runs and how much the evaluation measures.

    Attributes:
        steps: stage-1 steps of every AR fit (a model's own `steps:` wins).
        samples: images sampled per arm (and real images per held-out half).
        tokenizer_steps: the tokenizer's steps (needed unless the file pins a `tokenizer:`).
        finetune_steps: steps of a distilled model (needed when one has no `steps:` of its own).
        val_every, limit_val_batches: validation every k steps, on that many batches (None: all).
        train_images, val_images: split sizes (both or neither; the data source decides how: `split_overrides`).
        keep_every, curve_samples: keep the weights every k steps (0: never) and evaluate each with that many
            samples (learning curves).
        train_processes: each AR fit as DDP over that many CPU processes, each taking batch / processes (the
            global batch and the recipe stay the single-process ones; a model's own `processes:` wins).
        extract_processes: order extraction as DDP over that many CPU processes. Both count against `--jobs`.
        nll_images: held-out images of the NLL columns.
        sample_batch, sample_seed, sample_precision: how the arms sample (an arm's own `precision` wins).
        feature_epochs, feature_images: the training budget of the domain feature network (FID space).
    """

    steps: int
    samples: int
    tokenizer_steps: int | None = None
    finetune_steps: int | None = None
    val_every: int = 500
    limit_val_batches: int | float | None = None
    train_images: int | None = None
    val_images: int | None = None
    keep_every: int = 0
    curve_samples: int | None = None
    train_processes: int = 1
    extract_processes: int = 1
    nll_images: int = 500
    sample_batch: int = 100
    sample_seed: int = 0
    sample_precision: str = "fp32"
    feature_epochs: int = 10
    feature_images: int = 4000


@dataclass
class Model:
    """A trained AR model: its stage config, CLI overrides, and for a distilled one its parent and extraction."""

    stage: str
    overrides: dict = field(default_factory=dict)
    init_from: str | None = None
    extract: dict = field(default_factory=dict)  # extraction settings (model.init_args.extraction.<key>)
    steps: int | None = None
    processes: int | None = None


@dataclass
class Arm:
    """A row of the table: a model sampled with these `SamplerSettings` keys."""

    name: str
    model: str
    sampler: dict = field(default_factory=dict)


@dataclass
class Experiment:
    """One experiment file (see the module docstring). The runner adds `tokenizer_ckpt` (the checkpoint every
    stage reads) and `stages` (per stage its folder and the processor kinds it ran on) to `experiment.json`."""

    name: str
    data: str
    preset: str
    budget: Budget
    models: dict[str, Model]
    arms: list[Arm]
    seeds: list[int] = field(default_factory=lambda: [0])
    title: str = ""
    notes: str = ""
    paired: list[list[str]] = field(default_factory=list)
    data_overrides: dict = field(default_factory=dict)
    tokenizer: Pinned | None = None
    feature_net: Pinned | None = None
    inception_weights: str | None = None
    tokenizer_ckpt: str | None = None
    stages: dict = field(default_factory=dict)

    def model_steps(self, model: str) -> int:
        spec = self.models[model]
        if spec.steps is not None:
            return spec.steps
        return self.budget.finetune_steps if spec.stage == "distill" else self.budget.steps

    def arms_of(self, model: str) -> list[Arm]:
        return [a for a in self.arms if a.model == model]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def arm_settings(self, arm: Arm):
        """An arm's `SamplerSettings`: its own keys over the budget's sampling precision."""
        from models.sampling import SamplerSettings

        return SamplerSettings(**{"precision": self.budget.sample_precision, **arm.sampler})


def _build(cls: type, data, where: str):
    """`cls(**data)` with a line naming the unknown or missing keys of `where` instead of a TypeError."""
    if not isinstance(data, dict):
        raise ExperimentError(f"{where} must be a mapping of {cls.__name__} keys, got {data!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    unknown, missing = sorted(set(data) - names), sorted(required - set(data))
    if unknown or missing:
        said = "; ".join([*([f"unknown keys {unknown}"] if unknown else []),
                          *([f"missing keys {missing}"] if missing else [])])
        raise ExperimentError(f"{where}: {said} (the keys of {cls.__name__}: {', '.join(sorted(names))})")
    return cls(**data)


def _pinned(value, where: str) -> Pinned | None:
    if value is None or isinstance(value, Pinned):
        return value
    return Pinned(str(value)) if isinstance(value, str | Path) else _build(Pinned, value, where)


def from_dict(data: dict, name: str = "experiment") -> Experiment:
    """An `Experiment` from a plain mapping (an experiment file, or the `experiment.json` a run wrote)."""
    data = {"name": name, **data}
    exp = _build(Experiment, data, data["name"])
    exp.budget = _build(Budget, exp.budget, "budget")
    if not isinstance(exp.models, dict):
        raise ExperimentError(f"models: a mapping of name -> Model keys, got {exp.models!r}")
    exp.models = {m: _build(Model, spec, f"models.{m}") for m, spec in exp.models.items()}
    if not isinstance(exp.arms, list):
        raise ExperimentError(f"arms: a list of Arm mappings ({{name, model, sampler}}), got {exp.arms!r}")
    exp.arms = [_build(Arm, arm, f"arms[{i}]") for i, arm in enumerate(exp.arms)]
    exp.tokenizer, exp.feature_net = _pinned(exp.tokenizer, "tokenizer"), _pinned(exp.feature_net, "feature_net")
    return exp


def load_run(run_folder: Path) -> Experiment:
    """The experiment a run folder was made with, as the runner recorded it (`<run>/experiment.json`)."""
    path = Path(run_folder) / "experiment.json"
    if not path.is_file():
        raise ExperimentError(f"{path} not found: give a run folder of `python -m experiments` "
                              "(runs/experiments/<name>)")
    return from_dict(json.loads(path.read_text()))


def load_experiment(path: Path, overrides: list[str], device: str = "cpu") -> Experiment:
    """The experiment file with `--set` dotted overrides, checked whole, its `auto` precisions resolved."""
    if not Path(path).is_file():
        raise ExperimentError(f"experiment file {path} not found: name one of experiments/*.yaml or your own")
    try:
        cfg = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(overrides))
    except Exception as err:  # YAML syntax, a --set without '=': OmegaConf's message, on one line
        raise ExperimentError(f"{path}: {' '.join(str(err).split())}") from None
    exp = from_dict(OmegaConf.to_container(cfg, resolve=True), Path(path).stem)
    from experiments.checks import check_experiment  # it imports this module's types

    check_experiment(exp)
    return resolve_precisions(exp, device)


def resolve_precisions(exp: Experiment, device: str = "cpu") -> Experiment:
    """`exp` with every `auto` precision made concrete for `device`: bf16 where it pays (`bf16_pays`), else fp32."""
    from models.precision import bf16_pays

    sampling, training = ("bf16", "bf16-mixed") if bf16_pays(device) else ("fp32", "32-true")
    if exp.budget.sample_precision == "auto":
        exp.budget.sample_precision = sampling
    for arm in exp.arms:
        if arm.sampler.get("precision") == "auto":
            arm.sampler["precision"] = sampling
    for spec in exp.models.values():
        if spec.overrides.get("trainer.precision") == "auto":
            spec.overrides["trainer.precision"] = training
    return exp
