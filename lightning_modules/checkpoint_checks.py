"""Checks of an AR checkpoint against the data it is used with: the tokenizer its tokens came from, and the
number of classes. Each refusal is one line naming both sides and the fix."""

import logging

log = logging.getLogger("oar.train")


def tokenizer_record(datamodule) -> dict | None:
    """What an AR checkpoint records of the tokenizer its tokens came from (None outside token mode)."""
    if not getattr(datamodule, "tokenizer_ckpt", None):
        return None
    return {"path": str(datamodule.tokenizer_ckpt), "sha256": datamodule.token_manifest()["tokenizer_sha256"]}


def tokenizer_of(checkpoint: dict, what: str) -> dict | None:
    """An AR checkpoint's tokenizer record {"path", "sha256"} (None when it has none), refused when malformed."""
    record = checkpoint.get("tokenizer")
    if record is None:
        return None
    if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("path", "sha256")):
        raise ValueError(f"{what} has a malformed tokenizer record (it must be {{path, sha256}}): set "
                         "data.init_args.tokenizer_ckpt to the tokenizer the model was trained on, or pass a "
                         "checkpoint written by `python run.py fit`")
    return record


def check_trained_tokenizer(checkpoint: dict, ckpt_path: str, datamodule) -> None:
    """Refuse an AR checkpoint trained on the tokens of another tokenizer than `data.init_args.tokenizer_ckpt`.

    `ckpt_path` names the checkpoint in messages (its path and the option that gave it).

    Checks the tokenizer record (its file's sha256), then the vocabulary and grid of the network, which
    also covers checkpoints written before records existed (those load with a warning).

    Raises:
        ValueError: naming both checkpoints and the fix.
    """
    now = tokenizer_record(datamodule)
    if now is None:
        return
    was = tokenizer_of(checkpoint, ckpt_path)
    fix = "set data.init_args.tokenizer_ckpt to the tokenizer the model was trained with"
    if was is None:
        log.warning("%s records no tokenizer (written before tokenizer records): cannot check that it was "
                    "trained on %s (data.init_args.tokenizer_ckpt)", ckpt_path, now["path"])
    elif was["sha256"] != now["sha256"]:
        raise ValueError(f"{ckpt_path} was trained on the tokens of tokenizer {was['path']} (sha256 "
                         f"{was['sha256'][:12]}), but data.init_args.tokenizer_ckpt is {now['path']} (sha256 "
                         f"{now['sha256'][:12]}): {fix}, or retrain the model on the new tokenizer")
    spec = checkpoint.get("net_spec", {}).get("init_args", {})
    trained = (spec.get("vocab_size"), tuple(spec.get("grid_size") or ()))
    given = (datamodule.vocab_size, tuple(datamodule.grid_size))
    if None not in trained and trained != given:
        raise ValueError(f"{ckpt_path} was trained on {trained[0]} tokens and a grid of {trained[1][0]}x"
                         f"{trained[1][1]}, but tokenizer {now['path']} (data.init_args.tokenizer_ckpt) gives "
                         f"{given[0]} tokens and a grid of {given[1][0]}x{given[1][1]} at image_size "
                         f"{datamodule.image_size}: {fix} (and the image_size it was trained at)")


def check_trained_classes(checkpoint: dict, ckpt_path: str, datamodule) -> None:
    """Refuse data with another number of classes than the checkpoint's network (the data's count is linked in)."""
    trained = checkpoint.get("net_spec", {}).get("init_args", {}).get("num_classes")
    given = getattr(datamodule, "num_classes", None)
    if trained is not None and given is not None and trained != given:
        raise ValueError(f"{ckpt_path} was trained on data of {trained} classes, but data.init_args.source has "
                         f"{given}: give the data (or, for a folder, the class subfolders) the model was trained on")
