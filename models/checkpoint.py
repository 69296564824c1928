"""Rebuild a network from a Lightning checkpoint without Lightning.

Each network records its constructor arguments (`record_init`); the LightningModule stores
`net_spec(net)` in the checkpoint, and `load_net` imports the class and loads the `net.` weights.
"""

import importlib
from pathlib import Path

import torch
from torch import nn


def record_init(module: nn.Module, args: dict) -> None:
    """Keep a network's constructor arguments (pass `locals()` from its `__init__`)."""
    module.init_args = {k: v for k, v in args.items() if k not in ("self", "__class__")}


def net_spec(net: nn.Module) -> dict:
    """What `load_net` needs to rebuild `net`: its import path and constructor arguments."""
    cls = type(net)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(net.init_args)}


def build_net(spec: dict) -> nn.Module:
    module_name, _, cls_name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(**spec["init_args"])


def load_net(path: str | Path, prefix: str = "net.", map_location: str = "cpu") -> nn.Module:
    """Load the network stored under `prefix` in a checkpoint written by one of our LightningModules."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    if "net_spec" not in ckpt:
        raise ValueError(f"{path} has no 'net_spec': it was not written by this project's LightningModules")
    net = build_net(ckpt["net_spec"])
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    net.load_state_dict(state)
    return net.eval()
