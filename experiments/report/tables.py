"""The report's tables: the arms (mean ± std over seeds) beside the real-image rows, the paired differences,
and how to read them. Every number in them is measured by `evaluation/` (`experiments/evaluate.py` runs it).
"""

import statistics

from evaluation.feature_cache import scores_text


def feature_name(info: dict, inception: bool) -> str:
    """How the table's FID space was made, for the report header."""
    if inception:
        return "Inception-v3 pool3 (2048-d, torch-fidelity weights)"
    return (f"SmallConvNetFeatures (128-d penultimate layer of a small CNN trained for {info['epochs']:.0f} epochs "
            f"on {info['trained_on']} to predict {', '.join(info['heads'])}; held-out scores on "
            f"{info['check_images']} validation images: {scores_text(info['scores'])})")

# ----------------------------------------------------------------------------------------- report
COLUMNS = [("FID ↓", "fid", ".4g"), ("KID ↓", "kid", ".3g"), ("class acc. ↑", "class_accuracy", ".3f"),
           ("NLL raster", "nll_raster", ".3f"), ("NLL random", "nll_random", ".3f"),
           ("NLL inferred", "nll_inferred", ".3f"), ("NLL own order", "nll_own", ".3f"),
           ("consistency ↑", "consistency", ".3f"),
           ("sun found", "sun_share", ".3f"), ("clouds found", "cloud_share", ".3f"),
           ("sun step", "sun_step", ".2f"), ("cloud step", "cloud_step", ".2f"),
           ("diversity", "diversity", ".3f"), ("samples/s", "samples_per_s", ".1f")]

CEILING, REFERENCE = "tokenizer reconstruction (ceiling)", "real images (reference)"

def summarise(per_seed: list[dict]) -> dict:
    """metric -> [mean, std over seeds] (std 0 for one seed)."""
    keys = [k for k in per_seed[0] if all(k in d for d in per_seed)]  # an older run may lack a newer metric
    return {k: [statistics.fmean(d[k] for d in per_seed),
                statistics.stdev(d[k] for d in per_seed) if len(per_seed) > 1 else 0.0] for k in keys}

def _cell(stat: list[float] | None, spec: str, seeds: int) -> str:
    if stat is None:
        return "–"
    return f"{stat[0]:{spec}}" + (f" ± {stat[1]:{spec}}" if seeds > 1 else "")

def markdown_table(summary: dict, rows: dict, steps: dict, seeds: int) -> str:
    """Arms (mean ± std over seeds), then the real-image rows (`rows`: name -> metrics, one value each).

    Columns = the COLUMNS some row has, + train steps.
    """
    present = {k for stats in [*summary.values(), *rows.values()] for k in stats}
    cols = [c for c in COLUMNS if c[1] in present]
    lines = ["| arm | " + " | ".join(c[0] for c in cols) + " | train steps |", "|---|" + "---|" * (len(cols) + 1)]
    for arm, stats in summary.items():
        lines.append(f"| {arm} | " + " | ".join(_cell(stats.get(k), spec, seeds) for _, k, spec in cols)
                     + f" | {steps[arm]} |")
    for name, values in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{values[k]:{spec}}" if k in values else "–" for _, k, spec in cols)
                     + " | – |")
    return "\n".join(lines)

PAIRED_METRICS = [("fid", "FID", ".2f"), ("consistency", "consistency", ".3f"), ("nll_random", "NLL random", ".3f"),
                  ("nll_own", "NLL own order", ".3f")]

def paired_table(paired: list[dict]) -> str:
    """Markdown: one row per pair, each cell the mean ± std of a - b over seeds and the per-seed values."""
    head = "| a − b | seeds | " + " | ".join(f"Δ {label}" for _, label, _ in PAIRED_METRICS) + " |"
    lines = [head, "|" + "---|" * (2 + len(PAIRED_METRICS))]
    for p in paired:
        cells = []
        for key, _, spec in PAIRED_METRICS:
            v = p["diffs"].get(key)
            if v is None:
                cells.append("–")
                continue
            mean = statistics.fmean(v)
            std = f" ± {statistics.stdev(v):{spec}}" if len(v) > 1 else ""
            cells.append(f"{mean:+{spec}}{std} ({', '.join(f'{x:+{spec}}' for x in v)})")
        lines.append(f"| {p['a']} − {p['b']} | {', '.join(map(str, p['seeds']))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

def how_to_read(samples: int, nll_images: int, batch: int, device: str, inception: bool, lpips: bool,
                quick: bool) -> str:
    div = "mean pairwise LPIPS (AlexNet)" if lpips else (
        "mean pairwise Euclidean distance of L2-normalised feature-network features")
    quick_note = ("\nAt the --quick budget the networks are far from converged (see the NLL columns): the table "
                  "checks the pipeline; compare arms on full runs.") if quick else ""
    space = "Inception-v3 (pool3)" if inception else "the domain feature network described above"
    return f"""## How to read this
Rows of one model share its network (so the same NLLs) and differ only in the sampling order; an OAR
(distilled) model starts from the any-order network and is fine-tuned on the orders it extracted from the
training images.
FID and KID compare {samples} samples with a set B of {samples} real validation images in the space of
{space}; with so few samples they rank arms within this table only and are not comparable with
published FIDs. The validation images are split into two disjoint halves A and B that no
network trained on: the reference row is A against B, the floor of the metric at this sample size; the
ceiling row is A passed through the tokenizer (encode, decode) against B: no AR model over these tokens can
beat it. Class accuracy (class-conditional data) is the share of images the feature network assigns to the
label they were sampled for (a model that ignores the class scores near 1 / classes).
NLL is in bits per token on {nll_images} held-out images, under the raster order, one random order per
image, the inferred order (the extraction's teacher-forced greedy order: with the paper's score each cell
is chosen knowing its true token, so it is a lower bound, not a likelihood) and the model's own order
(greedy by max-probability given the tokens already placed, the order confidence sampling takes: a proper
likelihood, comparable with raster and random). A raster model is expected to be poor under random orders;
an order-aware model should be best in its own order.
Synthetic data only: consistency is the share of images whose cloud tint is the one their sun's hue causes;
sun found and clouds found are the shares of images in which the analyser finds a sun and clouds at all
(`evaluation.scene.scene_rates`); an image without a sun or clouds is not consistent. Sun step and cloud
step say when the sampling order writes the content: the mean step, as a share of all steps (0 first, 1 last),
of the cells holding sun pixels and of those holding cloud pixels (`evaluation.scene.content_steps`; a random
order gives 0.5, raster gives where the sun sits in the scan).
Diversity is the {div} among samples of one class (higher = more varied; compare with the reference row).
Samples/s is the sampler's throughput at batch {batch} on {device}, tokenizer decoding included (it
depends on the machine's load: see the load averages above).
± is the standard deviation over seeds. Train steps: stage-1 steps, plus the fine-tune for OAR
(order extraction over the training set costs extra time, not optimiser steps; see the stage times).{quick_note}
"""
