"""Read checkpoints safely and rebuild a network from one without Lightning.

Each network records its constructor arguments (`record_init`); the LightningModule stores
`net_spec(net)` in the checkpoint, and `load_net` imports the class and loads the `net.` weights.

Every file is read with `torch.load(weights_only=True)`: only tensors and plain data are unpickled, so a
file crafted to run code when unpickled is refused before anything runs. Whatever goes wrong (missing,
truncated, a text file, code inside, NaN weights) becomes a one-line error naming the file and the fix.
"""

import dataclasses
import importlib
import inspect
import os
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

_DROP = object()  # what `plain_data` leaves out


class UnreadableFileError(ValueError):
    """A file `read_checkpoint` refuses: truncated, corrupt, not a checkpoint, or holding code."""


RETRAIN_HINT = (
    "training diverged: retrain with a lower learning rate (model.init_args.optimizer.init_args.lr) "
    "or use an earlier checkpoint"
)


def record_init(module: nn.Module, args: dict) -> None:
    """Keep a network's constructor arguments (pass `locals()` from its `__init__`)."""
    module.init_args = {k: v for k, v in args.items() if k not in ("self", "__class__")}


def net_spec(net: nn.Module) -> dict:
    """What `load_net` needs to rebuild `net`: its import path and constructor arguments."""
    cls = type(net)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(net.init_args)}


# The network classes a file may name: a spec read from a checkpoint, cache or manifest is checked against these
# before anything is imported (a file never chooses code to run). Add a network of the project here.
NETWORK_CLASSES = frozenset({
    "models.transformer.OrderedTransformer",
    "models.tokenizer.VQAutoencoder",
    "models.llamagen_vq.LlamaGenVQ",
    "evaluation.feature_net.SmallConvNetFeatures",
})
_PLAIN = (type(None), bool, int, float, str)


def _plain_value(value) -> bool:
    """Plain data that names no class: numbers, strings, None, and lists/tuples/mappings of them (without a
    `class_path` key)."""
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (list, tuple)):
        return all(map(_plain_value, value))
    if isinstance(value, dict):
        return "class_path" not in value and all(isinstance(k, str) and _plain_value(v) for k, v in value.items())
    return False


def check_net_spec(spec, path: str | Path = "", what: str = "checkpoint") -> dict:
    """A network spec read from a file (`{"class_path", "init_args"}`), refused unless it names one of the project's
    networks (`NETWORK_CLASSES`) with plain constructor arguments; nothing is imported. Returns the spec.

    Raises:
        UnreadableFileError: one line naming the file, the key and what is wrong.
    """
    where = f"{what} {path}".strip()
    if not isinstance(spec, dict) or not isinstance(spec.get("class_path"), str) or \
            not isinstance(spec.get("init_args"), dict):
        raise UnreadableFileError(f"{where} has a malformed net_spec (it must be {{class_path, init_args}}): it was "
                                  "not written by this project; pass a checkpoint made by `python run.py fit`")
    if spec["class_path"] not in NETWORK_CLASSES:
        raise UnreadableFileError(f"{where} names the class {spec['class_path']!r} in net_spec.class_path, which is "
                                  f"not one of this project's networks ({', '.join(sorted(NETWORK_CLASSES))}): it is "
                                  "refused unread; pass a checkpoint made by this project")
    bad = [k for k, v in spec["init_args"].items() if not isinstance(k, str) or not _plain_value(v)]
    if bad:
        raise UnreadableFileError(f"{where} has net_spec.init_args.{bad[0]} that is not a plain value (numbers, "
                                  "strings, lists): it is refused unread; pass a checkpoint made by this project")
    return spec


def _net_class(spec: dict) -> type:
    check_net_spec(spec, what="network spec")
    module_name, _, cls_name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module_name), cls_name)


def build_net(spec: dict) -> nn.Module:
    return _net_class(spec)(**spec["init_args"])


def full_init_args(spec: dict) -> dict:
    """A spec's constructor arguments with the class's defaults filled in, so a checkpoint written before an
    argument existed compares equal to a network built with that argument's default."""
    params = inspect.signature(_net_class(spec)).parameters.values()
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    return {**defaults, **spec["init_args"]}


def plain_data(obj):
    """`obj` as data that `torch.load(weights_only=True)` reads back (for a checkpoint's hyper-parameters).

    Dataclasses and mappings (jsonargparse Namespaces included) become dicts, paths strings, a recorded
    network its `net_spec`; other objects (an optimizer factory given in Python) are left out, so a
    config merged with these values keeps its own.
    """
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return plain_data(dataclasses.asdict(obj))
    if isinstance(obj, nn.Module):
        return net_spec(obj) if hasattr(obj, "init_args") else _DROP
    if hasattr(obj, "items"):  # dict, Namespace, AttributeDict
        return {str(k): v for k, v in ((k, plain_data(v)) for k, v in obj.items()) if v is not _DROP}
    if isinstance(obj, (list, tuple)):
        return type(obj)(v for v in map(plain_data, obj) if v is not _DROP)
    return _DROP


def _is_zip(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"PK\x03\x04"  # torch.save's format is a zip archive


def _damaged_zip(path: Path) -> bool:
    """True when the archive is cut short or a record fails its CRC (torch.load checks neither)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is not None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return True


def _looks_like_text(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(512)
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return len(head) > 0 and b"\0" not in head


def read_checkpoint(path: str | Path, what: str = "checkpoint", fix: str = "pass another checkpoint",
                    mmap: bool = False) -> dict:
    """`torch.load(path, weights_only=True)` with one-line errors.

    Args:
        path: the file.
        what: how the error names it, e.g. "tokenizer checkpoint (data.init_args.tokenizer_ckpt)".
        fix: what the user should do, ending the error line.
        mmap: map the tensors instead of reading them (cheap checks of large files).

    Raises:
        FileNotFoundError: no such file.
        UnreadableFileError (a ValueError): truncated, corrupt, a text file, or holding objects that are
            not plain data.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found: {fix}")
    is_zip = _is_zip(path)
    if is_zip and _damaged_zip(path):
        raise UnreadableFileError(f"{what} {path} is truncated or corrupt: {fix}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and is_zip)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, KeyError, ...
        if isinstance(err, pickle.UnpicklingError) and "GLOBAL" in str(err):
            state = ("holds Python objects other than tensors and plain data, so it is refused unread "
                     "(unpickling them could run code)")
        elif _looks_like_text(path):
            state = "is a text file, not a checkpoint"
        else:
            state = "is truncated or corrupt" if is_zip else "is not a checkpoint made by torch.save (or is corrupt)"
        raise UnreadableFileError(f"{what} {path} {state}: {fix}") from err
    if not isinstance(ckpt, dict):
        raise UnreadableFileError(f"{what} {path} is not a checkpoint (it holds a {type(ckpt).__name__}): {fix}")
    return ckpt


def check_finite(state_dict: dict, path: str | Path, what: str = "checkpoint") -> None:
    """Refuse weights holding NaN or inf (a diverged run): ValueError naming the file and the fix."""
    bad = [k for k, v in state_dict.items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise ValueError(f"{what} {path} holds NaN/inf weights ({bad[0]}{more}): {RETRAIN_HINT}")


def net_weights(ckpt: dict, prefix: str = "net.") -> dict:
    """The state dict of the network stored under `prefix` of a Lightning checkpoint's `state_dict`."""
    return {k[len(prefix):]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith(prefix)}


def net_from_checkpoint(ckpt: dict, path: str | Path, what: str = "checkpoint", fix: str = "pass another checkpoint",
                        prefix: str = "net.") -> nn.Module:
    """Rebuild the network of a checkpoint read by `read_checkpoint` (checks its weights are finite)."""
    if "net_spec" not in ckpt or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"{what} {path} has no 'net_spec': it was not written by this project's "
                         f"LightningModules: {fix}")
    check_net_spec(ckpt["net_spec"], path, what)
    state = net_weights(ckpt, prefix)
    check_finite(state, path, what)
    net = build_net(ckpt["net_spec"])
    net.load_state_dict(state)
    return net.eval()


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def load_weights_into(net: nn.Module, ckpt: dict, path: str | Path, what: str = "checkpoint",
                      fix: str = "build the network from the checkpoint's net_spec", prefix: str = "net.") -> nn.Module:
    """Load a checkpoint's network weights (read by `read_checkpoint`) into `net`, which must be the network the
    checkpoint records (same class and constructor arguments; one line naming those that differ otherwise)."""
    if "net_spec" not in ckpt or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"{what} {path} has no 'net_spec': it was not written by this project's LightningModules")
    theirs, ours = full_init_args(check_net_spec(ckpt["net_spec"], path, what)), full_init_args(net_spec(net))
    differ = sorted(k for k in set(theirs) | set(ours) if _plain(theirs.get(k)) != _plain(ours.get(k)))
    if ckpt["net_spec"]["class_path"] != net_spec(net)["class_path"] or differ:
        raise ValueError(f"{what} {path} has another network ({', '.join(differ) or 'its class'} differ from "
                         f"model.init_args.net): {fix}")
    state = net_weights(ckpt, prefix)
    check_finite(state, path, what)
    net.load_state_dict(state)
    return net


def load_net(path: str | Path, prefix: str = "net.", what: str = "checkpoint",
             fix: str = "pass another checkpoint") -> nn.Module:
    """Load the network stored under `prefix` in a checkpoint written by one of our LightningModules."""
    return net_from_checkpoint(read_checkpoint(path, what, fix), path, what, fix, prefix)
