"""Speed of the ordered AR transformer (issues 3, 12): training, cached sampling, and a torch baseline.

Every row is a ratio of two things timed alternately in one run (see `benchmarks/timing.py`), and every
row runs in each dtype asked for (fp32 and bf16 by default, side by side; bf16 = autocast):
  (a) train step, random orders / raster order                              goal <= 1.05
  (b) confidence sampling, naive (full forward per candidate) / cached      goal >= 10 (64 tokens)
  (c) confidence-sampler FLOP/s / this machine's square-matmul FLOP/s, same dtype   goal >= 0.5
  (d) cached sampling, random order / raster order                          goal <= 1.1
  (e) train step, torch.nn.TransformerEncoder / ours (= our throughput / theirs)   goal >= 1.0
  (f) cached raster sampling, the loop of commit 461859e in fp32 (today) / this loop   goal >= 2
  (g) confidence sampling (exact) / random-order sampling                   goal <= 4
  (h) confidence sampling with a shortlist (approximate) / random-order sampling     goal <= 4
  (i) as (c), at the base preset (width 768, depth 14, heads 12), batch 16         goal >= 0.5
  (j) as (g), the next cell entering before the last block (next_pos_layer = depth - 1)  goal <= 4
Sampling rows use batch 64 and 64 tokens (8x8), the small preset (width 256, depth 4, heads 4, vocab 512);
(i) shows how far (c) is a property of the small preset's narrow matmuls (inner dimension 256).
`--preset base --grid 16` runs every row at the base preset on 256-token grids (the GPU table:
benchmarks/gpu_table.sh).

    python -m benchmarks.bench_ar --threads 1 [--quick] [--dtype fp32 bf16] [--device cpu|cuda] [--json out.json]
"""

import contextlib
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

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
from benchmarks.legacy_decode import legacy_sample
from benchmarks.timing import median_ratio, time_alternately
from models.orders import random_order, raster_order
from models.sampling import SamplerSettings, naive_confidence_sample, sample
from models.transformer import OrderedTransformer

RATIO = "A time / B time"  # the median over repeats of the ratio of A and B timed back to back


@dataclass
class Settings:
    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    grid: int = 8  # token grid grid x grid
    vocab: int = 512
    num_classes: int = 8
    batch: int = 32  # training (a, e)
    naive_batch: int = 4  # (b): the naive sampler runs ~n^2/2 full forwards
    naive_grid: int = 8
    sample_batch: int = 64  # (c, d, f, g, h)
    matmul_size: int = 2048  # (c): the reference square matmul
    shortlist: int = 8  # (h): cells rescored between full rankings
    refresh: int = 8  # (h): a full ranking every `refresh` steps
    base_net: dict | None = None  # (i): width / depth / heads of configs/model/ar/base.yaml
    base_batch: int = 16
    base_repeats: int = 2
    repeats: int = 5
    naive_repeats: int = 3
    warmup: int = 1

    @classmethod
    def from_args(cls, args) -> "Settings":
        if args.smoke:
            s = cls(width=32, depth=1, heads=2, grid=2, vocab=16, batch=2, naive_batch=2, naive_grid=2,
                    sample_batch=2, matmul_size=64, shortlist=1, refresh=2, repeats=1, naive_repeats=1, warmup=0,
                    base_net=dict(width=64, depth=1, heads=2), base_batch=2, base_repeats=1)
        else:
            s = cls(**ar_preset(args.preset)[0], base_net=ar_preset("base")[0])
            if args.quick:
                s.naive_grid, s.repeats, s.naive_repeats = 4, 3, 2
            if args.grid:
                s.grid = args.grid
        if args.repeats:
            s.repeats = s.naive_repeats = args.repeats
        return s

    def base(self) -> "Settings":
        """These settings with the base preset's network and batch (row (i))."""
        return replace(self, **self.base_net, sample_batch=self.base_batch, repeats=self.base_repeats)

    def net(self, device: torch.device, grid: int | None = None, next_pos_layer: int = 0) -> OrderedTransformer:
        grid = grid or self.grid
        return OrderedTransformer(self.vocab, (grid, grid), self.num_classes, self.width, self.depth, self.heads,
                                  self.mlp_ratio, next_pos_layer=next_pos_layer).to(device)

    def data(self, b: int, grid: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randint(self.vocab, (b, grid * grid), generator=gen).to(device)
        return tokens, torch.randint(self.num_classes, (b,), generator=gen).to(device)


# ------------------------------------------------------------------------------------------ training
class TorchBaseline(nn.Module):
    """The same-size causal transformer from torch.nn: embeddings, TransformerEncoder, head (raster only).

    Input position 0 holds the class (a row of the shared embedding table after the vocabulary), position t
    the token t - 1, plus a learned absolute position.
    """

    def __init__(self, s: Settings):
        super().__init__()
        n = s.grid * s.grid
        self.vocab = s.vocab
        self.emb = nn.Embedding(s.vocab + s.num_classes + 1, s.width)
        self.pos = nn.Parameter(torch.zeros(1, n, s.width).normal_(std=0.02))
        layer = nn.TransformerEncoderLayer(s.width, s.heads, int(s.width * s.mlp_ratio), dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, s.depth, norm=nn.LayerNorm(s.width), enable_nested_tensor=False)
        self.head = nn.Linear(s.width, s.vocab, bias=False)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(n), persistent=False)

    def forward(self, tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = torch.cat([(cond + self.vocab)[:, None], tokens[:, :-1]], dim=1)
        x = self.encoder(self.emb(x) + self.pos, mask=self.mask, is_causal=True)
        return self.head(x)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, loss_fn, ctx) -> None:
    """forward + backward + AdamW step."""
    with ctx:
        loss = loss_fn()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def ordered_loss(net: OrderedTransformer, tokens: torch.Tensor, cond: torch.Tensor, order_fn):
    """The training loss of `lightning_modules/any_order.py`, with the order drawn by `order_fn` each step."""
    def loss():
        order = order_fn()
        logits = net(tokens, order, cond)
        return F.cross_entropy(logits.flatten(0, 1).float(), tokens.gather(1, order).flatten())
    return loss


def bench_train(s: Settings, device, ctx) -> list[Row]:
    """(a) random / raster orders, and (e) torch.nn baseline / ours, all train steps timed alternately."""
    net = s.net(device)
    tokens, cond = s.data(s.batch, s.grid, device)
    b, n = tokens.shape
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    raster = ordered_loss(net, tokens, cond, lambda: raster_order(b, n, device=device))
    rand = ordered_loss(net, tokens, cond, lambda: random_order(b, n, device=device))
    base = TorchBaseline(s).to(device)
    base_opt = torch.optim.AdamW(base.parameters(), lr=1e-4)

    def base_loss():
        return F.cross_entropy(base(tokens, cond).flatten(0, 1).float(), tokens.flatten())

    fns = [lambda: train_step(net, opt, raster, ctx), lambda: train_step(net, opt, rand, ctx),
           lambda: train_step(base, base_opt, base_loss, ctx)]
    raw: list[list[float]] = []
    t_raster, t_random, t_base = time_alternately(fns, s.repeats, s.warmup, device, samples=raw)
    params = {"ours_params": sum(p.numel() for p in net.parameters()),
              "torch_params": sum(p.numel() for p in base.parameters())}
    return [
        Row("(a) train step, any-order / raster", f"random orders (b={b})", f"raster (b={b})",
            median_ratio(raw[1], raw[0]), RATIO, "<=", 1.05, t_random, t_raster, {}, raw[1], raw[0]),
        Row("(e) train throughput, ours / torch.nn", "torch TransformerEncoder, causal", f"ours, raster (b={b})",
            median_ratio(raw[2], raw[0]), RATIO, ">=", 1.0, t_base, t_raster, params, raw[2], raw[0]),
    ]


# ------------------------------------------------------------------------------------------ sampling
def sampling_flops(b: int, n: int, width: int, depth: int, hidden: int, vocab: int) -> float:
    """Useful FLOPs of one confidence-sampling run of b rows over n tokens (no CFG), counted analytically.

    Step t (t = 0..n-1) scores m = n - t candidates per row; each is a query at cache position t that
    attends to the t cached positions and to itself (L = t + 1 keys). A multiply-add is 2 FLOPs. Per
    candidate and layer (d width, h MLP hidden width):
        linear layers: 2 * (3d*d [qkv] + d*d [proj] + 2*d*h [mlp fc1, fc2])  = 8d^2 + 4dh  (24 d^2 at h = 4d)
        attention:     2*L*d [q . k] + 2*L*d [weights . v]                    = 4 L d
    and once per candidate the head, 2 d v. So
        FLOPs = b * sum_t (n - t) * (depth * (8d^2 + 4dh + 4(t + 1)d) + 2dv).
    Not counted: norms, softmaxes, embeddings, biases, and the m - 1 masked candidate keys that SDPA
    also multiplies (work the candidate mask throws away).
    """
    per_layer_linear = 8 * width * width + 4 * width * hidden
    total = 0
    for t in range(n):
        total += (n - t) * (depth * (per_layer_linear + 4 * (t + 1) * width) + 2 * width * vocab)
    return float(b * total)


def _sampler(net, cond, policy: str, seed: int, ctx, naive: bool = False, dtype: torch.dtype | None = None,
             **kwargs):
    """A sampling run; under `ctx` (autocast or nothing), or with the network cast to `dtype`."""
    settings = SamplerSettings(policy=policy, **kwargs)

    def run():
        gen = torch.Generator(device=cond.device).manual_seed(seed)
        with ctx:
            if naive:
                return naive_confidence_sample(net, cond, settings, generator=gen)
            return sample(net, cond, settings, generator=gen, dtype=dtype)
    return run


def _legacy_raster(net, cond, seed: int):
    def run():
        return legacy_sample(net, cond, "raster", torch.Generator(device=cond.device).manual_seed(seed))
    return run


def bench_naive(s: Settings, device, ctx, strict: bool) -> Row:
    """(b) naive / cached confidence sampling, after checking they write the same tokens in the same order."""
    net = s.net(device, s.naive_grid).eval()
    _, cond = s.data(s.naive_batch, s.naive_grid, device)
    cached, naive = _sampler(net, cond, "confidence", 1, ctx), _sampler(net, cond, "confidence", 1, ctx, naive=True)
    a, b = cached(), naive()  # also the warm-up
    same = torch.equal(a.tokens, b.tokens) and torch.equal(a.order, b.order)
    if strict and not same:
        raise AssertionError("cached and naive confidence sampling disagree under one seed")
    raw: list[list[float]] = []
    t_naive, t_cached = time_alternately([naive, cached], s.naive_repeats, 0, device, samples=raw)
    n = s.naive_grid**2
    goal_note = {} if n == 64 else {"note": "goal stated for 64 tokens; the speedup grows about like n / 3"}
    return Row(f"(b) confidence sampling, {n} tokens", f"naive, full forward per candidate (b={len(cond)})",
               f"cached + batched (b={len(cond)})", median_ratio(*raw), RATIO, ">=", 10.0,
               t_naive, t_cached, {"identical_outputs": same, "tokens": n, **goal_note}, *raw)


def matmul_rate(size: int, device, dtype: torch.dtype):
    """A square matmul and its FLOPs (the machine's reference rate)."""
    x = torch.randn(size, size, device=device, dtype=dtype)
    y = torch.randn(size, size, device=device, dtype=dtype)
    return (lambda: x @ y), 2.0 * size**3


def bench_sampling(s: Settings, device, dtype: str) -> list[Row]:
    """(c, d, f, g, h): the matmul, the samplers and today's raster loop, all timed alternately in one loop.

    The samplers run the network in `dtype` (`sample(..., dtype=...)`: a cast copy, fp32 logits).
    """
    net = s.net(device).eval()
    _, cond = s.data(s.sample_batch, s.grid, device)
    b, ctx, cast = len(cond), contextlib.nullcontext(), DTYPES[dtype]
    matmul, matmul_flops = matmul_rate(s.matmul_size, device, cast)
    fns = {"matmul": matmul, "confidence": _sampler(net, cond, "confidence", 2, ctx, dtype=cast),
           "random": _sampler(net, cond, "random", 3, ctx, dtype=cast),
           "raster": _sampler(net, cond, "raster", 3, ctx, dtype=cast),
           "shortlist": _sampler(net, cond, "confidence", 2, ctx, dtype=cast, shortlist=s.shortlist,
                                 refresh=s.refresh),
           "legacy": _legacy_raster(net, cond, 3),
           "late": _sampler(s.net(device, next_pos_layer=s.depth - 1).eval(), cond, "confidence", 2, ctx, dtype=cast)}
    t, raw = _timed(fns, s, device)
    ratio = lambda a_, b_: median_ratio(raw[a_], raw[b_])  # noqa: E731
    flops, extra = _flops(s, b, t, matmul_flops)
    short = f"shortlist {s.shortlist}, full ranking every {s.refresh} steps"
    rows = [
        _peak_row("(c) confidence sampler FLOP/s / matmul FLOP/s", s, dtype, flops / matmul_flops, t, raw, extra),
        Row("(d) cached sampling, random / raster", f"random order (b={b})", f"raster (b={b})",
            ratio("random", "raster"), RATIO, "<=", 1.1, t["random"], t["raster"], {}, raw["random"], raw["raster"]),
        Row("(f) cached raster sampling, today's loop (fp32) / this loop", f"loop of commit 461859e, fp32 (b={b})",
            f"this loop (b={b})", ratio("legacy", "raster"), RATIO, ">=", 2.0, t["legacy"], t["raster"], {},
            raw["legacy"], raw["raster"]),
        Row("(g) confidence (exact) / random-order sampling", f"confidence (b={b})", f"random order (b={b})",
            ratio("confidence", "random"), RATIO, "<=", 4.0, t["confidence"], t["random"], {},
            raw["confidence"], raw["random"]),
        Row("(h) confidence with a shortlist / random-order sampling", f"confidence, {short} (b={b})",
            f"random order (b={b})", ratio("shortlist", "random"), RATIO, "<=", 4.0, t["shortlist"], t["random"],
            {"shortlist": s.shortlist, "refresh": s.refresh}, raw["shortlist"], raw["random"]),
        Row("(j) confidence (exact), next cell before the last block / random-order sampling",
            f"confidence, next_pos_layer {s.depth - 1} of {s.depth} (b={b})", f"random order (b={b})",
            ratio("late", "random"), RATIO, "<=", 4.0, t["late"], t["random"], {"next_pos_layer": s.depth - 1},
            raw["late"], raw["random"]),
    ]
    return rows


def _timed(fns: dict, s: Settings, device) -> tuple[dict, dict]:
    """Time named callables alternately: median seconds and the raw samples, by name."""
    raw: list[list[float]] = []
    medians = time_alternately(list(fns.values()), s.repeats, s.warmup, device, samples=raw)
    return dict(zip(fns, medians, strict=True)), dict(zip(fns, raw, strict=True))


def _flops(s: Settings, b: int, t: dict, matmul_flops: float) -> tuple[float, dict]:
    """The confidence sampler's analytic FLOPs and the (c)/(i) row's extra figures."""
    flops = sampling_flops(b, s.grid**2, s.width, s.depth, int(s.width * s.mlp_ratio), s.vocab)
    width_note = {} if s.width >= 256 else {"note": "goal stated for width >= 256"}
    return flops, {"sampler_flops": flops, "sampler_gflops_per_s": flops / t["confidence"] / 1e9,
                   "matmul_gflops_per_s": matmul_flops / t["matmul"] / 1e9, "width": s.width, "depth": s.depth,
                   **width_note}


def _peak_row(name: str, s: Settings, dtype: str, flops_ratio: float, t: dict, raw: dict, extra: dict) -> Row:
    """A row: the confidence sampler's FLOP/s over the square matmul's, both timed alternately."""
    return Row(name, f"confidence sampling (b={s.sample_batch}, width {s.width}, depth {s.depth})",
               f"{s.matmul_size}^3 matmul, {dtype}", flops_ratio * median_ratio(raw["matmul"], raw["confidence"]),
               "A FLOP/s / B FLOP/s", ">=", 0.5, t["confidence"], t["matmul"], extra, raw["confidence"],
               raw["matmul"])


def bench_base_preset(s: Settings, device, dtype: str) -> Row:
    """(i): row (c) at the base preset, where the matmuls are 3x wider."""
    s = s.base()
    net = s.net(device).eval()
    _, cond = s.data(s.sample_batch, s.grid, device)
    matmul, matmul_flops = matmul_rate(s.matmul_size, device, DTYPES[dtype])
    fns = {"matmul": matmul,
           "confidence": _sampler(net, cond, "confidence", 2, contextlib.nullcontext(), dtype=DTYPES[dtype])}
    t, raw = _timed(fns, s, device)
    flops, extra = _flops(s, len(cond), t, matmul_flops)
    return _peak_row("(i) confidence sampler FLOP/s / matmul FLOP/s, base preset", s, dtype, flops / matmul_flops, t,
                     raw, extra)


def _tag(rows: list[Row], dtype: str) -> list[Row]:
    for row in rows:
        row.name = f"{row.name} [{dtype}]"
        row.extra["dtype"] = dtype
    return rows


def main(argv: list[str] | None = None) -> list[Row]:
    args = common_parser(__doc__.splitlines()[0]).parse_args(argv)
    device = setup_torch(args)
    s = Settings.from_args(args)
    config = {"preset": "smoke" if args.smoke else args.preset,
              "width": s.width, "depth": s.depth, "heads": s.heads, "mlp_ratio": s.mlp_ratio,
              "grid": f"{s.grid}x{s.grid}", "vocab": s.vocab, "num_classes": s.num_classes, "batch": s.batch,
              "naive_batch": s.naive_batch, "naive_grid": f"{s.naive_grid}x{s.naive_grid}",
              "sample_batch": s.sample_batch, "repeats": s.repeats, **environment(args, device)}
    rows, notes = [], []
    for dtype in args.dtype:
        ctx = autocast(device, dtype)
        dtype_rows = bench_train(s, device, ctx)
        naive = bench_naive(s, device, ctx, strict=dtype == "fp32")
        dtype_rows += [naive, *bench_sampling(s, device, dtype)]
        if s.width < s.base_net["width"]:  # (i) would repeat (c)
            dtype_rows.append(bench_base_preset(s, device, dtype))
        rows += _tag(dtype_rows, dtype)
        peak = next(r for r in dtype_rows if r.name.startswith("(c)")).extra["matmul_gflops_per_s"]
        notes.append(f"{dtype}: {s.matmul_size}^3 matmul {peak:.0f} GFLOP/s (this run); (b) outputs identical "
                     f"under one seed: {naive.extra['identical_outputs']}")
    rows.sort(key=lambda r: r.name)
    notes = ["ratio = median over repeats of A/B timed back to back (alternating); A and B medians are for reference",
             *notes, f"1-minute load average at start {config['load_at_start']}, at end {load()}",
             *contention_note(config)]
    report(config, rows, args.json, notes, {"settings": asdict(s)})
    print("\n" + side_by_side(rows, args.dtype), flush=True)
    return rows


if __name__ == "__main__":
    main()
