"""The LightningCLI of every stage (`python run.py ...`): facts linked from the data, checkpoints read safely.

Vocabulary size, token grid and number of classes are read by the DataModule (from the tokenizer
checkpoint and the data source) and linked into the network, and the tokenizer checkpoint into the AR
module (it decodes samples), so no config repeats them. What a checkpoint records is not typed again
either: the distillation stage builds its network from `init_from`'s spec, and a stage that reads an AR
checkpoint (`--ckpt_path`, `init_from`) without `data.init_args.tokenizer_ckpt` takes the tokenizer
that checkpoint was trained on. `--print_config` prints after these, so it shows the values used.

`--ckpt_path` is read as tensors and plain data only (`weights_only=True`), here and by the Trainer:
Lightning 2.6 reads the checkpoint's hyper-parameters with `weights_only=True` but hands the Trainer
`weights_only=None` (torch's default, which the TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD variable can turn off),
so this CLI passes True. The file is checked first: a damaged, unsafe or diverged (NaN) checkpoint
stops with one line naming it.
"""


import importlib
import logging
import sys

from jsonargparse._actions import _ActionPrintConfig
from lightning.pytorch.cli import LightningCLI

from callbacks.fid import FIDCallback
from datamodules.token_cache import check_image_size
from lightning_modules.any_order import TOKENIZER_FIX, AnyOrderModule, check_predict_split
from lightning_modules.distill import read_stage1
from models.checkpoint import check_finite, read_checkpoint
from models.precision import emulated_bf16_warning

# Model arguments that describe a run, not the network: a config's values win over the checkpoint's.
RUN_SETTINGS = ("sampler", "extraction", "edit", "predict_task")
# `--ckpt_path` values that Lightning resolves itself (not a file path).
CKPT_ALIASES = ("last", "best", "hpc", "registry")
# Facts of the data that the CLI links into every network that takes them.
LINKED_FACTS = ("vocab_size", "grid_size", "num_classes")
CKPT_WHAT = "checkpoint (--ckpt_path)"
CKPT_FIX = "pass a checkpoint written by `python run.py fit` of this stage (runs/<stage>/checkpoints/*.ckpt)"


def _class(class_path: str | None) -> type:
    """The class an import path names (object when none is given)."""
    if not class_path:
        return object
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _args(config, key: str):
    """The init_args of `config[key]` (model, data), or {} when the config has none."""
    return (config.get(key) or {}).get("init_args") or {}


class OARCLI(LightningCLI):
    _read: dict = {}  # the checkpoints read by `_parse_ckpt_path`, by the option that named them

    def add_arguments_to_parser(self, parser) -> None:
        # A link whose target the chosen network lacks (the tokenizer has no vocab_size) is skipped.
        for fact in LINKED_FACTS:
            parser.link_arguments(f"data.{fact}", f"model.init_args.net.init_args.{fact}", apply_on="instantiate")
        # FID is its own top-level key (not a trainer.callbacks element), so `--fid null` removes it.
        parser.add_lightning_class_args(FIDCallback, "fid", subclass_mode=True, required=False)

    def _instantiate_trainer(self, config: dict, callbacks: list) -> object:
        """Drop the forced callbacks set to null (`fid: null`, the default of stages without FID)."""
        return super()._instantiate_trainer(config, [c for c in callbacks if c is not None])

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
        """A tokenizer network must cut the images into whole tokens; predict runs over its task's split;
        bf16 on a device that emulates it is named (it is correct, only slow)."""
        warning = emulated_bf16_warning(self.trainer.precision, self.trainer.strategy.root_device)
        if warning:
            logging.getLogger(__name__).warning(warning)
        net, size = getattr(self.model, "net", None), getattr(self.datamodule, "image_size", None)
        if size is not None and isinstance(getattr(net, "downsample", None), int):
            check_image_size(size, net.downsample, "the tokenizer network (model.init_args.net)")
        task, split = getattr(self.model, "predict_task", None), getattr(self.datamodule, "predict_split", None)
        if self.subcommand == "predict" and task is not None and split is not None:
            check_predict_split(task, split)

    def parse_arguments(self, parser, args) -> None:
        """Parse, holding `--print_config` back until `_parse_ckpt_path` has read what checkpoints record.

        A config to print is not validated, as jsonargparse does (it may be incomplete: `fit --print_config`).
        """
        argv = sys.argv[1:] if args is None else args
        printing = isinstance(argv, list) and any(str(a).split("=")[0] == "--print_config" for a in argv)
        with _ActionPrintConfig.skip_print_config():
            if printing:
                self.config = parser.parse_args(args, _skip_validation=True)
            else:
                super().parse_arguments(parser, args)

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if kwargs.get("weights_only") is False:
            raise ValueError("--weights_only false is refused: checkpoints are read as tensors and plain data only; "
                             "drop the option")
        if "weights_only" in kwargs:
            kwargs["weights_only"] = True
        return kwargs

    def _check_ckpt_path(self, sub: str) -> dict:
        """Read `--ckpt_path` safely once (mapped, not copied): one-line errors for damaged or NaN files."""
        path = self.config[sub].get("ckpt_path")
        if not path or str(path) in CKPT_ALIASES or "://" in str(path):
            return {}
        ckpt = read_checkpoint(path, CKPT_WHAT, CKPT_FIX, mmap=True)
        check_finite(ckpt.get("state_dict", {}), path, CKPT_WHAT)
        held = ckpt.get("net_spec", {}).get("class_path")
        wanted = (_args(self.config[sub], "model").get("net") or {}).get("class_path")
        if held and wanted and held != wanted:
            raise ValueError(f"{CKPT_WHAT} {path} holds a network of class {held.rpartition('.')[2]}, but this "
                             f"config's network is {wanted.rpartition('.')[2]}: {CKPT_FIX}")
        return ckpt

    def _init_from(self, sub: str) -> dict:
        """The distillation stage's network is the one `init_from` records: its spec goes into the config."""
        model = self.config[sub].get("model") or {}
        path, net = _args(self.config[sub], "model").get("init_from"), _args(self.config[sub], "model").get("net")
        if not path or not net:
            return {}
        ckpt = read_stage1(path, net.class_path, mmap=True)
        spec = {**ckpt["net_spec"], "init_args": {k: v for k, v in ckpt["net_spec"]["init_args"].items()
                                                  if k not in LINKED_FACTS}}  # those come from the data
        update = {"class_path": model.class_path, "init_args": {"net": spec}}
        self.config = self.parser.parse_object({sub: {"model": update}}, self.config)
        return ckpt

    def _link_tokenizer(self, sub: str, read: dict) -> None:
        """Pass the data's tokenizer to an AR module; when data.init_args.tokenizer_ckpt is unset, the one its
        checkpoint records.

        By hand, not by `link_arguments`: the tokenizer module has no such argument, and jsonargparse does not
        skip the link for a module rebuilt from `--ckpt_path` hyper-parameters (they come as `dict_kwargs`).
        """
        model, data = self.config[sub].get("model") or {}, _args(self.config[sub], "data")
        if not data or not issubclass(_class(model.get("class_path")), AnyOrderModule):
            return
        for ckpt in read.values():  # --ckpt_path first: it is the model that runs
            if data.get("tokenizer_ckpt") is None and ckpt.get("tokenizer"):
                data.tokenizer_ckpt = ckpt["tokenizer"]["path"]
        model.init_args.tokenizer_ckpt = data.get("tokenizer_ckpt")

    def _fill_from_checkpoints(self, sub: str) -> dict:
        """What the checkpoints read record goes into the config; returns them by the option that named them."""
        read = {f"{self.config[sub].get('ckpt_path')} (--ckpt_path)": self._check_ckpt_path(sub)}
        init_from = self._init_from(sub)
        if init_from:
            read[f"{self.config[sub].model.init_args.init_from} (model.init_args.init_from)"] = init_from
        init_args = _args(self.config[sub], "model")
        kept = {k: init_args.get(k) for k in RUN_SETTINGS if init_args.get(k) is not None}
        try:
            super()._parse_ckpt_path()
        except SystemExit as err:  # jsonargparse rejected the checkpoint's hyper-parameters
            path = self.config[sub].get("ckpt_path")
            raise ValueError(f"{CKPT_WHAT} {path} was not written for this config's model (its hyper-parameters "
                             f"do not parse): {CKPT_FIX}") from err
        for key, value in kept.items():
            self.config[sub].model.init_args[key] = value
        self._link_tokenizer(sub, read)
        return {what: ckpt for what, ckpt in read.items() if ckpt}

    def _parse_ckpt_path(self) -> None:
        """Fill in what checkpoints record (network, tokenizer), then print the config if asked.

        With `--ckpt_path` the model is rebuilt from the checkpoint's config, keeping this run's
        sampling/extraction/edit settings and predict task.
        """
        sub = self.config.get("subcommand")
        with _ActionPrintConfig.skip_print_config():  # the parses of checkpoint values would print it half-done
            self._read = self._fill_from_checkpoints(sub) if sub else {}
        _ActionPrintConfig.print_config_if_requested(self.parser, self.config)

    def before_instantiate_classes(self) -> None:
        """An AR stage decodes with a tokenizer: the config's, or the one the checkpoint it reads records."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        model, data = config.get("model") or {}, _args(config, "data")
        if data.get("tokenizer_ckpt") is None and issubclass(_class(model.get("class_path")), AnyOrderModule):
            if not self._read:
                raise ValueError("data.init_args.tokenizer_ckpt is not set and no AR checkpoint is given: pass "
                                 "--ckpt_path (or model.init_args.init_from), whose checkpoint records its tokenizer, "
                                 f"or set data.init_args.tokenizer_ckpt ({TOKENIZER_FIX})")
            raise ValueError(f"data.init_args.tokenizer_ckpt is not set and {' and '.join(self._read)} records no "
                             "tokenizer (written before tokenizer records): set it to the tokenizer the model was "
                             "trained on")
