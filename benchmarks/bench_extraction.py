"""Speed of order extraction (issues 4, 12): KV-cached and batched vs the naive reference, and a projection.

Every row is a ratio of things timed alternately in one run (see `benchmarks/timing.py`), in each dtype
asked for (fp32 and bf16 by default, side by side; bf16 = autocast):
  (a) extraction, naive (full forward per candidate) / cached, same small batch     goal >= 10
  (b) cached extraction time per image, small batch / large batch (what batching buys)  goal >= 1
  (c) exact greedy / `positions_per_step` k (approximate: k cells per scoring pass)   reported
  (d) exact greedy, next cell at the input / before the last block (`next_pos_layer` depth - 1: exact for
      such a network, which runs only its last block per candidate)                   reported
Below the table: images/s at the large batch and the projected time for the Fashion-MNIST training
set (60000 images; twice that when flipped views are cached too), on one core and on two (one
process per core, e.g. DDP on CPU, at the CPU-time rate of this run).

    python -m benchmarks.bench_extraction --threads 1 [--quick] [--dtype fp32 bf16] [--device cpu|cuda] [--json F]
"""

import contextlib
import statistics
from dataclasses import asdict, dataclass

import torch

from benchmarks.harness import (
    DTYPES,
    Row,
    ar_preset,
    autocast,
    common_parser,
    contention_note,
    environment,
    load,
    report,
    setup_torch,
    side_by_side,
)
from benchmarks.timing import median_ratio, time_alternately
from models.extraction import ExtractionSettings, extract_orders, naive_extract_orders
from models.transformer import OrderedTransformer

FASHION_MNIST_TRAIN = 60000


@dataclass
class Settings:
    width: int = 256
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    grid: int = 8
    vocab: int = 512
    num_classes: int = 10
    naive_batch: int = 4  # the naive reference runs ~n^2/2 full forwards per image
    naive_grid: int = 8
    batch: int = 64  # the throughput batch
    positions_per_step: int = 2  # (c)
    repeats: int = 3
    warmup: int = 0  # the identity check already ran both once
    preset: str = ""

    @classmethod
    def from_args(cls, args) -> "Settings":
        if args.smoke:
            s = cls(width=32, depth=2, heads=2, grid=2, vocab=16, naive_batch=2, naive_grid=2, batch=4, repeats=1,
                    preset="smoke")
        else:
            preset, source = ar_preset(args.preset)
            s = cls(**preset, preset=source)
            if args.grid:
                s.grid = args.grid
            if args.quick:
                s.naive_grid, s.batch, s.repeats = 4, 16, 2
        if args.repeats:
            s.repeats = args.repeats
        return s

    def net(self, device: torch.device, grid: int, next_pos_layer: int = 0) -> OrderedTransformer:
        return OrderedTransformer(self.vocab, (grid, grid), self.num_classes, self.width, self.depth, self.heads,
                                  self.mlp_ratio, next_pos_layer=next_pos_layer).to(device).eval()

    def data(self, b: int, grid: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randint(self.vocab, (b, grid * grid), generator=gen).to(device)
        return tokens, torch.randint(self.num_classes, (b,), generator=gen).to(device)


def _extractor(fn, net, tokens, cond, ctx, **kwargs):
    def run():
        with ctx:
            return fn(net, tokens, cond, **kwargs)
    return run


def _duration(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


def bench(s: Settings, device, dtype: str, strict: bool) -> tuple[list[Row], dict]:
    """Naive and cached at the small batch, cached (exact and k per step) at the large batch: timed alternately.

    The cached extraction runs the network in `dtype` (`extract_orders(..., dtype=...)`: a cast copy);
    the naive reference runs under autocast.
    """
    small_net = s.net(device, s.naive_grid)
    tokens, cond = s.data(s.naive_batch, s.naive_grid, device)
    ctx, cast = contextlib.nullcontext(), {"dtype": DTYPES[dtype]}
    naive = _extractor(naive_extract_orders, small_net, tokens, cond, autocast(device, dtype))
    cached = _extractor(extract_orders, small_net, tokens, cond, ctx, **cast)
    same = torch.equal(naive(), cached())
    if strict and not same:
        raise AssertionError("cached and naive extraction disagree")
    same_grid = s.grid == s.naive_grid  # --quick compares with the naive one on a smaller grid
    net = small_net if same_grid else s.net(device, s.grid)
    small = cached if same_grid else _extractor(extract_orders, net, *s.data(s.naive_batch, s.grid, device), ctx,
                                                **cast)
    big = s.data(s.batch, s.grid, device, seed=1)
    batched = _extractor(extract_orders, net, *big, ctx, **cast)
    k = s.positions_per_step
    several = _extractor(extract_orders, net, *big, ctx, settings=ExtractionSettings(positions_per_step=k), **cast)
    late = _extractor(extract_orders, s.net(device, s.grid, next_pos_layer=s.depth - 1), *big, ctx, **cast)
    batched(), small(), several(), late()  # warm-up at the new shapes
    fns = {"naive": naive, "cached": cached, "small": small, "late": late, "several": several, "batched": batched}
    if same_grid:
        del fns["small"]  # the cached run at the small batch is already `cached`
    raw_list: list[list[float]] = []
    cpu_list: list[list[float]] = []
    times = time_alternately(list(fns.values()), s.repeats, s.warmup, device, samples=raw_list, cpu_samples=cpu_list)
    raw, cpu, t = (dict(zip(fns, x, strict=True)) for x in (raw_list, cpu_list, times))
    raw.setdefault("small", raw["cached"])
    t.setdefault("small", t["cached"])
    n_naive = s.naive_grid**2
    rows = [
        Row(f"(a) extraction, {n_naive} tokens", f"naive, full forward per candidate (b={s.naive_batch})",
            f"cached + batched (b={s.naive_batch})", median_ratio(raw["naive"], raw["cached"]), "A time / B time", ">=",
            10.0, t["naive"], t["cached"], {"identical_orders": same, "tokens": n_naive,
                                            **({} if n_naive == 64 else {"note": "goal stated for 64 tokens"})},
            raw["naive"], raw["cached"]),
        Row(f"(b) cached extraction per image, {s.grid**2} tokens", f"batch {s.naive_batch}", f"batch {s.batch}",
            median_ratio(raw["small"], raw["batched"]) * s.batch / s.naive_batch, "A time/image / B time/image",
            ">=", 1.0, t["small"], t["batched"], {}, raw["small"], raw["batched"]),
        Row(f"(c) extraction, exact / {k} cells per step", f"exact greedy (b={s.batch})",
            f"positions_per_step {k} (b={s.batch})", median_ratio(raw["batched"], raw["several"]), "A time / B time",
            ">=", 1.0, t["batched"], t["several"], {"positions_per_step": k}, raw["batched"], raw["several"]),
        Row(f"(d) extraction, next cell at the input / before block {s.depth - 1} of {s.depth}",
            f"next_pos_layer 0 (b={s.batch})", f"next_pos_layer {s.depth - 1} (b={s.batch})",
            median_ratio(raw["batched"], raw["late"]), "A time / B time", ">=", 1.0, t["batched"], t["late"],
            {"next_pos_layer": s.depth - 1}, raw["batched"], raw["late"]),
    ]
    rate, cpu_rate = s.batch / t["batched"], s.batch / max(statistics.median(cpu["batched"]), 1e-9)
    late_cpu_rate = s.batch / max(statistics.median(cpu["late"]), 1e-9)
    projection = {"images_per_s": rate, "fashion_mnist_train_s": FASHION_MNIST_TRAIN / rate,
                  "fashion_mnist_train_with_flips_s": 2 * FASHION_MNIST_TRAIN / rate,
                  "images_per_cpu_s": cpu_rate, "fashion_mnist_train_cpu_s": FASHION_MNIST_TRAIN / cpu_rate,
                  "fashion_mnist_train_two_cores_s": FASHION_MNIST_TRAIN / (2 * cpu_rate),
                  "cpu_share": rate / cpu_rate / torch.get_num_threads(),  # CPU time / (wall time x threads)
                  "next_pos_layer_late_two_cores_s": FASHION_MNIST_TRAIN / (2 * late_cpu_rate)}
    return rows, projection


def _notes(s: Settings, device, dtype: str, p: dict) -> list[str]:
    threads = torch.get_num_threads()
    return [
        f"{dtype}: cached rate at batch {s.batch}: {p['images_per_s']:.2f} images/s on {device} "
        f"({p['images_per_cpu_s']:.2f} per CPU second); Fashion-MNIST train set ({FASHION_MNIST_TRAIN} images): "
        f"{_duration(p['fashion_mnist_train_s'])} in this run "
        f"(with flips {_duration(p['fashion_mnist_train_with_flips_s'])}); "
        f"on two idle cores (one process each) {_duration(p['fashion_mnist_train_two_cores_s'])}; "
        f"a network with next_pos_layer {s.depth - 1} (row d): {_duration(p['next_pos_layer_late_two_cores_s'])}",
        f"{dtype}: the run got {p['cpu_share']:.0%} of {threads} thread(s) of CPU time "
        "(below 100%: other jobs took the rest and the wall-time rate is pessimistic)",
    ]


def main(argv: list[str] | None = None) -> list[Row]:
    args = common_parser(__doc__.splitlines()[0]).parse_args(argv)
    device = setup_torch(args)
    s = Settings.from_args(args)
    config = {"preset": s.preset, "width": s.width, "depth": s.depth, "heads": s.heads, "mlp_ratio": s.mlp_ratio,
              "grid": f"{s.grid}x{s.grid}", "vocab": s.vocab, "num_classes": s.num_classes, "batch": s.batch,
              "naive_batch": s.naive_batch, "naive_grid": f"{s.naive_grid}x{s.naive_grid}", "repeats": s.repeats,
              "score": "true_prob", **environment(args, device)}
    rows, notes, projections = [], [], {}
    for dtype in args.dtype:
        dtype_rows, projections[dtype] = bench(s, device, dtype, strict=dtype == "fp32")
        for row in dtype_rows:
            row.name, row.extra["dtype"] = f"{row.name} [{dtype}]", dtype
        rows += dtype_rows
        notes += [f"{dtype}: (a) orders identical: {dtype_rows[0].extra['identical_orders']}",
                  *_notes(s, device, dtype, projections[dtype])]
    rows.sort(key=lambda r: r.name)
    notes = ["ratio = median over repeats of A/B timed back to back (alternating); A and B medians are for reference",
             *notes, f"1-minute load average at start {config['load_at_start']}, at end {load()}",
             *contention_note(config)]
    report(config, rows, args.json, notes, {"projection": projections, "settings": asdict(s)})
    print("\n" + side_by_side(rows, args.dtype), flush=True)
    return rows


if __name__ == "__main__":
    main()
