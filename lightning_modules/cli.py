"""The LightningCLI of every stage (`python run.py ...`): facts linked from the data, checkpoints read as data.

Vocabulary size, token grid and number of classes are read by the DataModule (from the tokenizer checkpoint and the
data source) and linked into the network, and the tokenizer checkpoint into the AR modules (they decode samples), so
no config repeats them. What a checkpoint records is not typed again either: a resumed fit (`--ckpt_path`) and the
distillation stage (`init_from`) build their network from the spec the checkpoint records, and a stage that reads an
AR checkpoint without `data.init_args.tokenizer_ckpt` takes the tokenizer that checkpoint was trained on.
`--print_config` prints after these, so it shows the values used.

Nothing read from a checkpoint chooses code: the stage config names the module, the optimizer and every other class;
a checkpoint contributes its network's constructor arguments (plain values; the network class must be the config's,
and one of the project's, `models.checkpoint.ALLOWED_CLASSES`), its tokenizer record and, for Lightning, its weights
and loop state. (Lightning's own `_parse_ckpt_path` would rebuild the module from the checkpoint's hyper-parameters,
class paths included, so `--ckpt_path` is held back from it: `parse_arguments` stashes it and
`before_instantiate_classes` gives it back.) A checkpoint of another stage than the config's is refused with one line.
`predict` runs a job module of `lightning_modules/predict.py`, which reads `--ckpt_path` itself.
"""

import importlib
import logging
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from callbacks.fid import FIDCallback
from datamodules.token_cache import check_image_size
from lightning_modules.any_order import AnyOrderModule
from lightning_modules.checkpoint_checks import tokenizer_of
from lightning_modules.cli_compat import print_config_after
from lightning_modules.distill import read_stage1
from lightning_modules.predict import CKPT_FIX, CKPT_WHAT, TOKENIZER_FIX, PredictModule
from models.checkpoint import check_finite, check_net_spec, read_checkpoint
from models.precision import emulated_bf16_warning

# Facts of the data that the CLI links into every network that takes them.
LINKED_FACTS = ("vocab_size", "grid_size", "num_classes")
# The stage config of each training module, for the error that names the right one.
STAGE_CONFIGS = {"AnyOrderModule": "configs/any_order.yaml (raster: with configs/experiment/raster.yaml)",
                 "DistillModule": "configs/distill.yaml", "TokenizerModule": "configs/tokenizer.yaml"}
PREDICT_JOBS = "configs/sample.yaml, configs/extract_orders.yaml or configs/edit.yaml"


def _class(class_path: str | None) -> type:
    """The class an import path of the config names (object when none is given)."""
    if not class_path:
        return object
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _args(config, key: str):
    """The init_args of `config[key]` (model, data), or {} when the config has none."""
    return (config.get(key) or {}).get("init_args") or {}


def checkpoint_stage(ckpt: dict) -> str | None:
    """The class name of the module that wrote a checkpoint (its record, else its hyper-parameters), as plain data."""
    trained = ckpt.get("trained")
    if isinstance(trained, dict) and trained.get("stage"):
        return str(trained["stage"])
    class_path = (ckpt.get("hyper_parameters") or {}).get("_class_path")
    return str(class_path).rpartition(".")[2] if class_path else None


class OARCLI(LightningCLI):
    _read: dict = {}  # the checkpoints read, by the option that named them
    _ckpt_path = None  # `--ckpt_path`, held back from Lightning's hyper-parameter parsing

    def add_arguments_to_parser(self, parser) -> None:
        # A link whose target the chosen network lacks (the tokenizer has no vocab_size) is skipped.
        for fact in LINKED_FACTS:
            parser.link_arguments(f"data.{fact}", f"model.init_args.net.init_args.{fact}", apply_on="instantiate")
        # FID is its own top-level key (not a trainer.callbacks element), so `--fid null` removes it.
        parser.add_subclass_arguments(FIDCallback, "fid", required=False)

    def parse_arguments(self, parser, args) -> None:
        """Parse, then fill in what the checkpoints record (network, tokenizer); `--print_config` prints after."""
        with print_config_after(parser, args) as held:
            self.config = held.parse()
            sub = self.config.get("subcommand")
            self._read = self._fill_from_checkpoints(sub) if sub else {}
            if sub:  # Lightning would rebuild the module from the checkpoint's hyper-parameters: not with ours
                self._ckpt_path, self.config[sub].ckpt_path = self.config[sub].get("ckpt_path"), None
        held.print_if_requested(self.config)

    def before_instantiate_classes(self) -> None:
        """Give `--ckpt_path` back (a fit resumes from it); checkpoints are read as tensors and plain data only."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        logger = (config.get("trainer") or {}).get("logger")
        save_dir = (logger.get("init_args") or {}).get("save_dir") if hasattr(logger, "get") else None
        if save_dir and Path(save_dir).is_file():
            raise ValueError(f"trainer.logger.init_args.save_dir = {save_dir} is a file, not a folder: give a run "
                             "folder (it is created if missing)")
        if self.subcommand:
            config.ckpt_path = self._ckpt_path
            if config.get("weights_only") is False:
                raise ValueError("--weights_only false is refused: checkpoints are read as tensors and plain data "
                                 "only; drop the option")
            if "weights_only" in config:
                config.weights_only = True
        model, data = config.get("model") or {}, _args(config, "data")
        if data.get("tokenizer_ckpt") is None and issubclass(_class(model.get("class_path")),
                                                             (AnyOrderModule, PredictModule)):
            if not self._read:
                raise ValueError("data.init_args.tokenizer_ckpt is not set and no AR checkpoint is given: pass "
                                 "--ckpt_path (or model.init_args.init_from), whose checkpoint records its tokenizer, "
                                 f"or set data.init_args.tokenizer_ckpt ({TOKENIZER_FIX})")
            raise ValueError(f"data.init_args.tokenizer_ckpt is not set and {' and '.join(self._read)} records no "
                             "tokenizer (written before tokenizer records): set it to the tokenizer the model was "
                             "trained on")

    def instantiate_trainer(self, **kwargs):
        """The trainer, with the FID callback of the `fid` key unless it is null."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        if config.get("fid") is not None:
            kwargs["callbacks"] = [*((config.get("trainer") or {}).get("callbacks") or []), config["fid"]]
        return super().instantiate_trainer(**kwargs)

    def instantiate_classes(self) -> None:
        """Surface our one-line errors (missing checkpoint, stale file) instead of jsonargparse's wrapper."""
        try:
            super().instantiate_classes()
        except ValueError as err:
            ours, cause = None, err.__cause__ or err.__context__
            while cause is not None:  # the deepest FileNotFoundError/ValueError under jsonargparse's wrapper
                if isinstance(cause, (FileNotFoundError, ValueError)):
                    ours = cause
                cause = cause.__cause__ or cause.__context__
            if ours is not None:
                raise type(ours)(str(ours)) from None  # a fresh copy: re-raising `ours` would make a cycle
            raise

    def after_instantiate_classes(self) -> None:
        """A tokenizer network must cut the images into whole tokens; bf16 on a device that emulates it is named (it
        is correct, only slow)."""
        warning = emulated_bf16_warning(self.trainer.precision, self.trainer.strategy.root_device)
        if warning:
            logging.getLogger(__name__).warning(warning)
        net, size = getattr(self.model, "net", None), getattr(self.datamodule, "image_size", None)
        if size is not None and isinstance(getattr(net, "downsample", None), int):
            check_image_size(size, net.downsample, "the tokenizer network (model.init_args.net)")

    # ---- what checkpoints record goes into the config --------------------------------------------------------------
    def _fill_from_checkpoints(self, sub: str) -> dict:
        """Fill the config from `--ckpt_path` and `init_from`; returns the checkpoints read, by the option."""
        model_class = _class((self.config[sub].get("model") or {}).get("class_path"))
        path = self.config[sub].get("ckpt_path")
        if str(path) == "last":  # Lightning's alias, resolved here so that the file is checked like any other
            path = self.config[sub].ckpt_path = self._last_checkpoint(sub, start_afresh=sub == "fit")
        if issubclass(model_class, PredictModule):
            path = path or _args(self.config[sub], "model").get("checkpoint")
        if sub == "predict" and not issubclass(model_class, PredictModule):
            raise ValueError(f"predict runs a job on a trained model: use {PREDICT_JOBS} (this config's model is "
                             f"{model_class.__name__}, which trains)")
        read = {}
        if path:
            read[f"{path} (--ckpt_path)"] = ckpt = self._read_ckpt_path(path)
            if issubclass(model_class, PredictModule):
                self.config[sub].model.init_args.checkpoint = str(path)  # the job reads it; Lightning restores nothing
            else:
                self._check_stage(ckpt, path, model_class)
                if sub == "fit" and "optimizer_states" not in ckpt:
                    raise ValueError(f"{CKPT_WHAT} {path} holds a network only (a converted release or an exported "
                                     "model), not a training state to resume: fine-tune it with --config "
                                     f"configs/distill.yaml --model.init_args.init_from {path}, or sample it with "
                                     "configs/sample.yaml")
            self._net_from(ckpt, sub, path, CKPT_WHAT)
        init_from = _args(self.config[sub], "model").get("init_from")
        if init_from and not path:  # resuming: the checkpoint's network wins, init_from is ignored
            net = _args(self.config[sub], "model").get("net")
            ckpt = read_stage1(init_from, net.class_path, mmap=True)
            read[f"{init_from} (model.init_args.init_from)"] = ckpt
            self._net_from(ckpt, sub, init_from, "stage-1 checkpoint (model.init_args.init_from)")
        self._link_tokenizer(sub, model_class, read)
        return read

    def _last_checkpoint(self, sub: str, start_afresh: bool) -> str | None:
        """`--ckpt_path last`: the run folder's last.ckpt (trainer.logger.init_args.save_dir/checkpoints).

        With none there, `fit` starts afresh (a requeued job's first run, docs/clusters.md), as Lightning's alias
        does; the other subcommands have nothing to run on.
        """
        logger = (self.config[sub].get("trainer") or {}).get("logger") or {}
        save_dir = (logger.get("init_args") or {}).get("save_dir") if isinstance(logger, dict) or hasattr(
            logger, "get") else None
        path = f"{save_dir}/checkpoints/last.ckpt" if save_dir else None
        if path is None or not Path(path).is_file():
            if start_afresh and path is not None:
                logging.getLogger(__name__).warning("--ckpt_path last: there is no %s yet: training starts afresh",
                                                    path)
                return None
            raise FileNotFoundError(f"--ckpt_path last: there is no {path or 'run folder (trainer.logger)'} to resume: "
                                    "start without --ckpt_path, or pass the checkpoint file")
        return path

    @staticmethod
    def _read_ckpt_path(path) -> dict:
        """Read `--ckpt_path` safely once (mapped, not copied): one-line errors for damaged, unsafe or NaN files."""
        if str(path) in ("best", "hpc", "registry") or "://" in str(path):
            raise ValueError(f"--ckpt_path {path}: give the checkpoint file itself (e.g. runs/<stage>/checkpoints/"
                             "last.ckpt), so that it is checked before it is used")
        ckpt = read_checkpoint(path, CKPT_WHAT, CKPT_FIX, mmap=True)
        if "state_dict" not in ckpt or "net_spec" not in ckpt:
            raise ValueError(f"{CKPT_WHAT} {path} is not a checkpoint written by this project's `run.py fit` (no "
                             f"state_dict or net_spec): {CKPT_FIX}")
        check_finite(ckpt.get("state_dict", {}), path, CKPT_WHAT)
        return ckpt

    @staticmethod
    def _check_stage(ckpt: dict, path, model_class: type) -> None:
        """Refuse resuming a checkpoint of another stage (one line naming the config that resumes it)."""
        held = checkpoint_stage(ckpt)
        if held and held != model_class.__name__:
            config = STAGE_CONFIGS.get(held, f"the config of {held}")
            raise ValueError(f"{CKPT_WHAT} {path} was written by the {held} stage, but this config trains "
                             f"{model_class.__name__}: resume it with --config {config}")

    def _net_from(self, ckpt: dict, sub: str, path, what: str) -> None:
        """The network a checkpoint records goes into the config: its class must be the config's, its arguments are
        plain values (the data's facts come from the data)."""
        net = _args(self.config[sub], "model").get("net")
        if not net:
            return
        spec = check_net_spec(ckpt.get("net_spec"), path, what)
        if spec["class_path"] != net.class_path:
            raise ValueError(f"{what} {path} holds a network of class {spec['class_path'].rpartition('.')[2]}, but "
                             f"this config's network is {net.class_path.rpartition('.')[2]}: {CKPT_FIX}")
        init_args = {k: v for k, v in spec["init_args"].items() if k not in LINKED_FACTS}
        model = self.config[sub].model
        self.config = self.parser.parse_object(
            {sub: {"model": {"class_path": model.class_path,
                             "init_args": {"net": {"class_path": spec["class_path"], "init_args": init_args}}}}},
            self.config)

    def _link_tokenizer(self, sub: str, model_class: type, read: dict) -> None:
        """Pass the data's tokenizer to an AR module; when data.init_args.tokenizer_ckpt is unset, the one its
        checkpoint records (by hand: the tokenizer module has no such argument to link)."""
        model, data = self.config[sub].get("model") or {}, _args(self.config[sub], "data")
        if not data or not issubclass(model_class, (AnyOrderModule, PredictModule)):
            return
        for what, ckpt in read.items():  # --ckpt_path first: it is the model that runs
            record = tokenizer_of(ckpt, what)
            if data.get("tokenizer_ckpt") is None and record is not None:
                data.tokenizer_ckpt = record["path"]
        model.init_args.tokenizer_ckpt = data.get("tokenizer_ckpt")
