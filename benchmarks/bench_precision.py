"""Does bf16 pay on this machine? bf16 against fp32 on the same work, timed alternately in one run (issue 12).

    python -m benchmarks.bench_precision --threads 1 [--preset small] [--json out.json]

Three rows, each the bf16 time over the fp32 time (below 1: bf16 pays):
- (p1) a 1024^3 matmul (the machine's peak rate in each dtype);
- (p2) a training step (forward, backward, AdamW) under random orders: autocast, as Lightning's `bf16-mixed`;
- (p3) cached random-order sampling: a bf16 copy of the network, as `SamplerSettings(precision="bf16")`.
The notes say what `precision: auto` picks here (`models.precision.bf16_pays`) and whether the rows agree
with it: on AMX or AVX512-BF16 CPUs and bf16 tensor-core GPUs bf16 should be the faster one, elsewhere it
is emulated and fp32 should be. The goal is stated for the device's own verdict: bf16 / fp32 <= 1 where
auto picks bf16, >= 1 where it picks fp32.
"""

import contextlib

import torch

from benchmarks.bench_ar import Settings, _sampler, matmul_rate, ordered_loss, train_step
from benchmarks.harness import Row, autocast, common_parser, environment, load, report, setup_torch
from benchmarks.timing import median_ratio, time_alternately
from models.orders import random_order
from models.precision import bf16_pays

RATIO = "bf16 time / fp32 time"
# The matmul side: 1024^3, not bench_ar's 2048^3, which took 125 s per call in emulated bf16 (AMD EPYC, AVX2).
MATMUL_SIZE = 1024


def paired_row(name: str, what: str, fns: tuple, s: Settings, device, pays: bool) -> Row:
    """bf16 (A) and fp32 (B) versions of one piece of work, timed alternately."""
    raw: list[list[float]] = []
    t_bf16, t_fp32 = time_alternately(list(fns), s.repeats, s.warmup, device, samples=raw)
    goal_op = "<=" if pays else ">="
    return Row(name, f"{what}, bf16", f"{what}, fp32", median_ratio(raw[0], raw[1]), RATIO, goal_op, 1.0,
               t_bf16, t_fp32, {}, raw[0], raw[1])


def bench(s: Settings, device, pays: bool) -> list[Row]:
    rows = []
    size = min(MATMUL_SIZE, s.matmul_size)
    mm_bf16, flops = matmul_rate(size, device, torch.bfloat16)
    mm_fp32, _ = matmul_rate(size, device, torch.float32)
    row = paired_row("(p1) matmul", f"{size}^3", (mm_bf16, mm_fp32), s, device, pays)
    row.extra.update(bf16_gflops_per_s=flops / row.a_median_s / 1e9, fp32_gflops_per_s=flops / row.b_median_s / 1e9)
    rows.append(row)

    net = s.net(device)
    tokens, cond = s.data(s.batch, s.grid, device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    loss = ordered_loss(net, tokens, cond, lambda: random_order(*tokens.shape, device=device))
    steps = (lambda: train_step(net, opt, loss, autocast(device, "bf16")),
             lambda: train_step(net, opt, loss, autocast(device, "fp32")))
    rows.append(paired_row("(p2) train step, bf16-mixed / fp32", f"random orders (b={s.batch})", steps, s, device,
                           pays))

    net.eval()
    _, cond = s.data(s.sample_batch, s.grid, device)
    no_autocast = contextlib.nullcontext()  # the bf16 side decodes with a bf16 copy of the network, not autocast
    samplers = (_sampler(net, cond, "random", 3, no_autocast, dtype=torch.bfloat16),
                _sampler(net, cond, "random", 3, no_autocast))
    rows.append(paired_row("(p3) cached random-order sampling", f"b={s.sample_batch}", samplers, s, device, pays))
    return rows


def main(argv: list[str] | None = None) -> list[Row]:
    parser = common_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    args.dtype = ["fp32", "bf16"]  # both, always: the rows compare them
    device = setup_torch(args)
    s = Settings.from_args(args)
    pays = bf16_pays(device)
    config = {"preset": "smoke" if args.smoke else args.preset, "width": s.width, "depth": s.depth,
              "grid": f"{s.grid}x{s.grid}", "batch": s.batch, "sample_batch": s.sample_batch, "repeats": s.repeats,
              **environment(args, device)}
    rows = bench(s, device, pays)
    verdict = "bf16" if pays else "fp32"
    agree = all(r.passed for r in rows)
    notes = ["ratio = median over repeats of bf16 time / fp32 time, timed back to back (alternating)",
             f"precision auto picks {verdict} here (models.precision.bf16_pays: {pays}); the rows "
             f"{'agree' if agree else 'DISAGREE: see which row'}",
             f"matmul: bf16 {rows[0].extra['bf16_gflops_per_s']:.3g} GFLOP/s, "
             f"fp32 {rows[0].extra['fp32_gflops_per_s']:.3g} GFLOP/s",
             f"1-minute load average at start {config['load_at_start']}, at end {load()}"]
    report(config, rows, args.json, notes)
    return rows


if __name__ == "__main__":
    main()
