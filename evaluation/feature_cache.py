"""The domain feature network of a dataset, trained once and cached: the feature space of FID/KID and diversity.

On a source with scene factors (the synthetic sunsets) it learns them from fresh renders of another
seed; on other data it learns the class from training images. It never sees the validation images the
comparison uses as real references (`evaluation.real`). The cache file is keyed by the data, the split
and the network's settings: anything else retrains.
"""

import hashlib
import logging
from pathlib import Path

import torch

from evaluation.feature_net import SmallConvNetFeatures, head_scores, targets_for, train_feature_net
from evaluation.real import images_of
from fileio import save_torch
from models.checkpoint import build_net, net_spec

log = logging.getLogger("oar.evaluation")

FEATURE_SEED = 1_000_003  # seed of the fresh synthetic images the feature network learns from (no split uses it)


def scores_text(scores: dict) -> str:
    """Held-out head scores in one line: accuracy of classifiers, R² of regressions."""
    return ", ".join(f"{name} {'acc' if 'accuracy' in s else 'R²'} {s.get('accuracy', s.get('r2')):.3f}"
                     for name, s in scores.items())


def _cached(path: Path, key: dict) -> tuple | None:
    """(net, info) from the cache file when it holds this key; None when missing, stale or unreadable."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)  # plain data: read, never run
    except Exception as err:  # a damaged cache is rebuilt
        log.warning("feature net: %s is unreadable (%s); training again", path, err)
        return None
    if saved.get("key") != key:
        return None
    net = build_net(key["net_spec"])
    net.load_state_dict(saved["state_dict"])
    log.info("feature net: reusing %s", path)
    return net.eval(), saved["info"]


def pinned_mismatch(path: Path, key: dict) -> str:
    """Why a pinned feature network cannot serve `key`: the parts of its key that differ (or that it is unreadable)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)["key"]
    except Exception as err:  # noqa: BLE001 - any damage is reported the same way
        return f"it is unreadable ({err})"
    differ = sorted(k for k in {*key, *saved} if saved.get(k) != key.get(k))
    return f"it was trained for other data or settings (its {', '.join(differ)} differ)"


def feature_net_for(dm, path: Path, epochs: int, feature_images: int, check: torch.Tensor,
                    pinned: bool = False) -> tuple:
    """The domain feature network of the data `dm` (its `source` and `split_indices()`), cached under `path`.

    Args:
        dm: the DataModule.
        path: the cache file.
        epochs: training epochs.
        feature_images: training images (synthetic: fresh renders; else the first training images).
        check: held-out (validation) indices its per-head scores are measured on.
        pinned: `path` is a published network the table must use: one that does not fit the data and
            settings stops with one line (ValueError) instead of being trained again.

    Returns:
        (net in eval mode, info dict: train images, epochs, seconds, label_head, heads, held-out scores per head).
    """
    source = dm.source
    structured = hasattr(source, "scene_heads")
    if structured:  # the scene parameters are known for any number of fresh images
        source = source.with_seed(FEATURE_SEED + source.seed, feature_images)
        train_idx = torch.arange(feature_images)
    else:
        train_idx = dm.split_indices()[0][:feature_images]
    heads, _, label_head = targets_for(dm.source, check[:1], torch.zeros(1))
    # width 16 learns the scene factors as well as 32 at a third of the time (measured); classes keep 32
    with torch.random.fork_rng():  # the same initial weights in every run, whatever the global random state
        torch.manual_seed(FEATURE_SEED)
        net = SmallConvNetFeatures(heads, width=16 if structured else 32)
    split = hashlib.sha256(torch.cat(dm.split_indices()).numpy().tobytes()).hexdigest()[:16]
    key = {"fingerprint": source.fingerprint(), "split": split, "net_spec": net_spec(net), "epochs": epochs,
           "feature_images": feature_images, "check": check.tolist()}
    cached = _cached(path, key)
    if cached is not None:
        return cached
    if pinned:
        raise ValueError(f"the pinned feature network {path} does not fit this experiment: "
                         f"{pinned_mismatch(path, key)}; pin the one published with this table's data and budget, "
                         "or remove `feature_net:`")
    train_x, train_y = images_of(source, train_idx)
    _, targets, _ = targets_for(source, train_idx, train_y)
    trained_on = f"{len(train_x)} {'fresh synthetic' if structured else 'real train'} images"
    log.info("feature net: training on %s for %d epochs", trained_on, epochs)
    info = train_feature_net(net, train_x, targets, max_epochs=epochs, flip=not structured)
    check_x, check_y = images_of(dm.source, check)
    info.update(trained_on=trained_on, label_head=label_head, heads=heads,
                scores=head_scores(net, check_x, targets_for(dm.source, check, check_y)[1]), check_images=len(check))
    save_torch({"key": key, "state_dict": net.state_dict(), "info": info}, path)
    log.info("feature net: %s after %.1f epochs (%.0f s)", scores_text(info["scores"]), info["epochs"], info["seconds"])
    return net, info
