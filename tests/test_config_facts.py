"""Each fact is typed in one place of configs/, `--print_config` shows every value a stage runs with (those read
from checkpoints included), and each predict job does its one job, whatever the batch holds.
"""

import inspect

import pytest
import torch
import yaml

from experiments.plan import stage_argv, stage_config_files
from experiments.spec import from_dict
from lightning_modules.any_order import AnyOrderModule
from lightning_modules.distill import DistillModule
from lightning_modules.extract import ExtractModule
from lightning_modules.predict import SampleModule, Trained
from models.checkpoint import build_net, load_net, read_checkpoint
from models.sampling import SamplerSettings
from tests.conftest import (
    CONFIGS,
    QUIET,
    SMALL_DATA,
    STAGE1_CKPT,
    TOKENIZER_CKPT,
    config,
    copy_run,
    run_cli,
    save_ar_checkpoint,
    stage_configs,
)

AR_SIZES = ("width", "depth", "heads")
TOKENIZER_SIZES = ("channels", "channel_mult", "num_res_blocks", "codebook_size", "code_dim")
SAMPLER_KEYS = tuple(inspect.signature(SamplerSettings).parameters)


def printed(capsys, *args) -> dict:
    """`python run.py *args --print_config`, parsed."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*args, "--print_config")
    assert exit_info.value.code in (None, 0)
    return yaml.safe_load(capsys.readouterr().out)


def net_args(cfg: dict) -> dict:
    return cfg["model"]["init_args"]["net"]["init_args"]


def preset(name: str) -> dict:
    return yaml.safe_load((CONFIGS / "model" / f"{name}.yaml").read_text())["model"]["init_args"]["net"]["init_args"]


def key_paths(tree, prefix: str = "") -> list[str]:
    """Every dotted key path of a YAML tree (list items keep their parent's path)."""
    if isinstance(tree, dict):
        return [p for k, v in tree.items() for p in [f"{prefix}{k}", *key_paths(v, f"{prefix}{k}.")]]
    if isinstance(tree, list):
        return [p for item in tree for p in key_paths(item, prefix)]
    return []


def files_typing(key: str) -> list[str]:
    """The YAMLs of configs/ (presets and overlays included) in which a key path ending in `key` is typed."""
    return sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")
                  if any(k == key or k.endswith(f".{key}") for k in key_paths(yaml.safe_load(p.read_text()))))


# ---- each fact in one place ----------------------------------------------------------------------------------------
def test_network_sizes_are_typed_only_in_the_size_presets():
    ar_presets = sorted(str(p.relative_to(CONFIGS)) for p in (CONFIGS / "model" / "ar").glob("*.yaml"))
    assert {"model/ar/tiny.yaml", "model/ar/randar_l.yaml"} <= set(ar_presets)  # the released sizes are presets too
    for key in AR_SIZES:
        assert files_typing(key) == ar_presets, key
    for key in TOKENIZER_SIZES:
        assert files_typing(key) == [f"model/tokenizer/{p}.yaml" for p in ("base", "small", "tiny")], key


def test_tokenizer_path_and_sampler_settings_are_typed_once():
    assert files_typing("tokenizer_ckpt") == ["any_order.yaml"]  # later stages read it from their checkpoint
    typed = {key: files_typing(f"sampler.{key}") for key in SAMPLER_KEYS}
    assert typed == {**{key: [] for key in SAMPLER_KEYS},
                     "policy": ["edit.yaml", "experiment/raster.yaml", "sample.yaml"],
                     "precision": ["edit.yaml", "sample.yaml"],  # sampling and editing run bf16 where it pays
                     "choice_temperature": ["edit.yaml", "sample.yaml"]}  # auto: what each checkpoint samples best with


def test_the_stage_configs_include_their_small_preset_last():
    """The include is the file's last key: it merges over the file (a key before it would be dropped)."""
    for stage, kind in (("any_order", "ar"), ("tokenizer", "tokenizer")):
        text = yaml.safe_load((CONFIGS / f"{stage}.yaml").read_text())
        assert list(text)[-1] == "config" and text["config"] == f"model/{kind}/small.yaml"


# ---- --print_config shows what runs --------------------------------------------------------------------------------
README_FITS = {  # the stage/overlay combinations the README shows, and what their printed config must hold
    "any_order": ((), {"sizes": preset("ar/small"), "train_order": "random", "policy": "auto",
                       "save_dir": "runs/any_order"}),
    "any_order + base": (("model/ar/base",), {"sizes": preset("ar/base")}),
    "any_order + base + fashion_mnist + gpu": (
        ("model/ar/base", "data/fashion_mnist", "trainer/gpu"),
        {"sizes": preset("ar/base"), "source": "datamodules.sources.FashionMNISTSource"}),
    "any_order + folder": (("data/folder",), {"sizes": preset("ar/small"),
                                              "source": "datamodules.sources.ImageFolderSource"}),
    "raster": (("experiment/raster",), {"sizes": preset("ar/small"), "train_order": "raster", "policy": "raster",
                                        "save_dir": "runs/raster"}),
    "tokenizer": ((), {"sizes": preset("tokenizer/small")}),
    "tokenizer + base": (("model/tokenizer/base",), {"sizes": preset("tokenizer/base")}),
    "tokenizer + folder": (("data/folder",), {"sizes": preset("tokenizer/small"),
                                              "source": "datamodules.sources.ImageFolderSource"}),
}


@pytest.mark.parametrize("case", README_FITS)
def test_print_config_of_the_readme_fits_shows_every_value(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    overlays, expected = README_FITS[case]
    stage = case.split(" + ")[0]
    stage = "tokenizer" if stage == "tokenizer" else "any_order"
    cfg = printed(capsys, "fit", "--config", config(stage), *(a for o in overlays for a in ("--config", config(o))))
    net = net_args(cfg)
    assert {k: (list(net[k]) if isinstance(net[k], tuple) else net[k]) for k in expected["sizes"]} == expected["sizes"]
    if stage == "any_order":
        model = cfg["model"]["init_args"]
        assert set(model["sampler"]) == set(SAMPLER_KEYS)  # every sampler setting, defaults included
        assert model["train_order"] == expected.get("train_order", "random")
        assert model["sampler"]["policy"] == expected.get("policy", "auto")  # confidence for any-order training
        assert cfg["data"]["init_args"]["tokenizer_ckpt"] == str(TOKENIZER_CKPT)
    if "save_dir" in expected:
        assert cfg["trainer"]["logger"]["init_args"]["save_dir"] == expected["save_dir"]
    if "source" in expected:
        assert cfg["data"]["init_args"]["source"]["class_path"] == expected["source"]


def test_a_later_config_and_the_command_line_win_over_the_included_preset(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = printed(capsys, "fit", "--config", config("any_order"), "--config", config("model/ar/tiny"),
                  "--model.init_args.net.init_args.depth", "3")
    assert [net_args(cfg)[k] for k in AR_SIZES] == [preset("ar/tiny")["width"], 3, preset("ar/tiny")["heads"]]


def test_print_config_without_a_config_still_prints(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert "trainer" in printed(capsys, "fit")


def stage1_spec(folder) -> dict:
    return read_checkpoint(folder / STAGE1_CKPT)["net_spec"]["init_args"]


@pytest.mark.parametrize("stage", ["distill", "distill + base"])
def test_print_config_of_distillation_shows_the_stage1_network_and_tokenizer(stage, orders_run, tmp_path,
                                                                            monkeypatch, capsys):
    """No size is typed in distill.yaml: the network is init_from's, whatever size preset is given."""
    monkeypatch.chdir(copy_run(orders_run, tmp_path))
    extra = ("--config", config("model/ar/base")) if stage.endswith("base") else ()
    cfg = printed(capsys, "fit", "--config", config("distill"), *extra)
    spec = stage1_spec(tmp_path)
    assert {k: net_args(cfg)[k] for k in (*AR_SIZES, "next_pos", "own_pos")} == \
        {k: spec[k] for k in (*AR_SIZES, "next_pos", "own_pos")}
    assert cfg["data"]["init_args"]["tokenizer_ckpt"] == str(TOKENIZER_CKPT)  # the record of init_from
    model = cfg["model"]["init_args"]
    assert model["warmup_steps"] == 50 and model["label_dropout"] == 0.1 and set(model["sampler"]) == set(SAMPLER_KEYS)


def test_distillation_builds_the_stage1_network_even_under_another_preset(orders_run, tmp_path, monkeypatch):
    import run

    monkeypatch.chdir(copy_run(orders_run, tmp_path))
    monkeypatch.setattr(run.OARCLI, "_run_subcommand", lambda self, subcommand: None)
    cli = run_cli("fit", "--config", config("distill"), "--config", config("model/ar/base"), *SMALL_DATA, *QUIET)
    assert {k: cli.model.net.init_args[k] for k in AR_SIZES} == {k: stage1_spec(tmp_path)[k] for k in AR_SIZES}
    assert cli.model.tokenizer_ckpt == str(TOKENIZER_CKPT)


def test_distillation_keeps_stage1_trainer_logger_and_callbacks_typed_only_in_any_order_yaml(orders_run, tmp_path,
                                                                                          monkeypatch, capsys):
    """distill.yaml includes any_order.yaml: the logger, the callbacks and FID are typed there once, and the
    fine-tune changes only what it names (its folder, its budget, how often FID runs)."""
    text = yaml.safe_load((CONFIGS / "distill.yaml").read_text())
    assert text["config"] == "any_order.yaml" and "trainer" not in text and "fid" not in text
    monkeypatch.chdir(copy_run(orders_run, tmp_path))
    distill = printed(capsys, "fit", "--config", config("distill"))
    stage1 = printed(capsys, "fit", "--config", config("any_order"), "--data.init_args.tokenizer_ckpt",
                     str(TOKENIZER_CKPT))
    assert distill["trainer"]["callbacks"] == stage1["trainer"]["callbacks"]
    assert distill["trainer"]["logger"]["init_args"]["save_dir"] == "runs/distill"
    assert stage1["trainer"]["logger"]["init_args"]["save_dir"] == "runs/any_order"
    changed = {k for k in stage1["trainer"] if distill["trainer"][k] != stage1["trainer"][k]}
    assert changed == {"logger", "max_epochs", "max_time"}
    assert (distill["fid"]["init_args"]["every_n_epochs"], stage1["fid"]["init_args"]["every_n_epochs"]) == (2, 10)
    assert distill["model"]["class_path"].endswith("DistillModule") and "orders_path" in distill["data"]["init_args"]


@pytest.mark.parametrize("stage,job,setting", [("sample", "SampleModule", "sampler.cfg_scale"),
                                               ("extract_orders", "ExtractModule", "extraction.positions_per_step"),
                                               ("edit", "EditModule", "edit.samples_per_image")])
def test_print_config_of_predict_shows_the_checkpoint_network_and_tokenizer(stage, job, setting, stage1_run, tmp_path,
                                                                           monkeypatch, capsys):
    monkeypatch.chdir(copy_run(stage1_run, tmp_path))
    cfg = printed(capsys, "predict", "--config", config(stage), "--ckpt_path", STAGE1_CKPT,
                  f"--model.init_args.{setting}", "2")
    spec = stage1_spec(tmp_path)
    assert {k: net_args(cfg)[k] for k in AR_SIZES} == {k: spec[k] for k in AR_SIZES}
    model = cfg["model"]["init_args"]
    assert cfg["model"]["class_path"].endswith(job) and model["checkpoint"] == str(STAGE1_CKPT)
    group, key = setting.split(".")
    assert model[group][key] == 2  # this run's settings kept
    assert cfg["data"]["init_args"]["tokenizer_ckpt"] == model["tokenizer_ckpt"] == str(TOKENIZER_CKPT)


def test_distill_module_takes_its_parents_arguments_by_name():
    assert list(inspect.signature(DistillModule).parameters) == ["init_from", "random_order_prob", "other_orders",
                                                                 "kwargs"]


def test_the_experiment_runner_names_the_raster_overlay():
    exp = from_dict({"data": "synthetic", "preset": "tiny", "budget": {"steps": 1, "samples": 1}, "models": {},
                     "arms": []})
    argv = stage_argv(exp, "fit", "raster", {})
    files = [argv[i + 1] for i, a in enumerate(argv) if a == "--config"]
    assert files[:2] == ["configs/any_order.yaml", "configs/experiment/raster.yaml"]
    assert [str(p) for p in stage_config_files("raster")] == [a for a in stage_configs("raster") if a != "--config"]


# ---- one job per predict module, whatever the batch holds ---------------------------------------------------------
def tiny_checkpoint(tmp_path, trained: dict | None = None):
    net = build_net({"class_path": "models.transformer.OrderedTransformer",
                     "init_args": {"vocab_size": 64, "grid_size": (8, 8), "num_classes": 8, "width": 16, "depth": 1,
                                   "heads": 2}})
    return str(save_ar_checkpoint(net, tmp_path / "tiny.ckpt", trained))


BATCH = {"tokens": torch.randint(64, (3, 8, 8)), "label": torch.tensor([0, 1, 2]), "index": torch.arange(3),
         "flip": torch.zeros(3, dtype=torch.long), "seed": torch.tensor([5, 6, 7])}


def test_each_job_does_its_own_work_whatever_the_batch_holds(tokenizer_run, tmp_path):
    """A batch holding tokens and sample requests alike: the module, not the keys, decides."""
    ckpt = tiny_checkpoint(tmp_path)
    sampled = SampleModule(checkpoint=ckpt, tokenizer_ckpt=str(tokenizer_run / TOKENIZER_CKPT)).predict_step(BATCH, 0)
    assert sampled["images"].shape == (3, 3, 32, 32) and sampled["images"].dtype == torch.uint8
    extracted = ExtractModule(checkpoint=ckpt).predict_step(BATCH, 0)
    assert set(extracted) == {"order", "index", "flip", "k"}
    assert (extracted["order"].sort(dim=1).values == torch.arange(64)).all()


def test_the_tokenizer_is_injected_not_found(tokenizer_run, tmp_path):
    """Built outside any Trainer and DataModule, the job loads its tokenizer from the path it is given."""
    ckpt = tiny_checkpoint(tmp_path)
    module = SampleModule(checkpoint=ckpt, tokenizer_ckpt=str(tokenizer_run / TOKENIZER_CKPT))
    reference = load_net(tokenizer_run / TOKENIZER_CKPT)
    assert all(torch.equal(a, b) for a, b in zip(module.tokenizer.state_dict().values(),
                                                 reference.state_dict().values(), strict=True))
    assert not any(p.requires_grad for p in module.tokenizer.parameters())
    with pytest.raises(RuntimeError, match="tokenizer_ckpt"):
        SampleModule(checkpoint=ckpt).generate(torch.tensor([0]))


@pytest.mark.parametrize("trained,policy,temperature", [
    ({"stage": "AnyOrderModule", "train_order": "random", "choice_temperature": 3.0}, "confidence", 3.0),
    ({"stage": "DistillModule", "train_order": "random", "choice_temperature": 0.0}, "confidence", 0.0),
    ({"stage": "AnyOrderModule", "train_order": "raster", "choice_temperature": 3.0}, "raster", 3.0),
])
def test_auto_sampler_follows_the_checkpoint_training(trained, policy, temperature, tokenizer_run, tmp_path):
    """policy and choice_temperature auto: a raster model samples in raster order, an any-order one in confidence
    order with the noise its training suits; an explicit policy is used as given."""
    ckpt = tiny_checkpoint(tmp_path, trained)
    tok = str(tokenizer_run / TOKENIZER_CKPT)
    module = SampleModule(checkpoint=ckpt, tokenizer_ckpt=tok)
    assert (module.sampler.policy, module.sampler.choice_temperature) == (policy, temperature)
    out = module.predict_step(BATCH, 0)
    if policy == "raster":
        assert torch.equal(out["order"], torch.arange(64).expand(3, 64))
    explicit = SampleModule(checkpoint=ckpt, sampler=SamplerSettings(policy="random"), tokenizer_ckpt=tok)
    assert explicit.sampler.policy == "random"


@pytest.mark.parametrize("hyper_parameters,expected", [
    ({"_class_path": "lightning_modules.any_order.AnyOrderModule", "train_order": "raster"},
     Trained("AnyOrderModule", "raster", 3.0)),
    ({"_class_path": "lightning_modules.distill.DistillModule", "random_order_prob": 0.2},
     Trained("DistillModule", "random", 0.0)),
    ({"_class_path": "lightning_modules.distill.DistillModule", "random_order_prob": 1.0},
     Trained("DistillModule", "random", 3.0)),
])
def test_checkpoints_written_before_the_trained_record_are_read_from_their_hyper_parameters(hyper_parameters,
                                                                                           expected):
    assert Trained.of({"hyper_parameters": hyper_parameters}) == expected


def test_a_training_module_records_what_its_predict_jobs_read():
    net = build_net({"class_path": "models.transformer.OrderedTransformer",
                     "init_args": {"vocab_size": 16, "grid_size": (2, 2), "width": 16, "depth": 1, "heads": 2}})
    assert AnyOrderModule(net, train_order="raster").trained == Trained("AnyOrderModule", "raster", 3.0)
    assert DistillModule(net=net).trained == Trained("DistillModule", "random", 0.0)
