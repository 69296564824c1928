"""What each network variant of the any-order-gap issue costs: parameters, training and sampling time, each
timed alternately with today's default (absolute next position, GPT block) in one run.

    python -m benchmarks.bench_variants --threads 1 --dtype fp32 [--preset small] [--json out.json]

Rows, one per variant V (A = V, B = the default; ratio = V time / default time, median of back-to-back pairs):
- (v1) training step (forward, backward, AdamW) on random orders (raster for the raster arms), batch 64;
  goal <= 1.25, i.e. throughput >= 0.8 x today's (the issue's goal for the winner);
- (v2) cached random-order sampling (raster order for the raster arms); (v3) exact confidence sampling (every
  unwritten cell scored each step), for the any-order arms.
Instruction tokens double the sequence (2n slots): their rows say what that costs. The extra figures hold each
variant's parameter count and its share of the default's (the A/B matches them within 10%).
"""

import contextlib

import torch

from benchmarks.bench_ar import Settings, _sampler, ordered_loss, train_step
from benchmarks.harness import Row, autocast, common_parser, environment, load, report, setup_torch
from benchmarks.timing import median_ratio, time_alternately
from models.orders import random_order, raster_order
from models.transformer import OrderedTransformer

RATIO = "A time / B time"
# name -> (net keyword arguments, training order); the first is the default everything is timed against
VARIANTS = {
    "absolute, gpt (default)": ({"next_pos": "absolute", "own_pos": "learned", "block": "gpt"}, "random"),
    "absolute, llama": ({"next_pos": "absolute", "own_pos": "rope", "block": "llama"}, "random"),
    "target_rope, gpt": ({"next_pos": "target_rope", "own_pos": "rope", "block": "gpt"}, "random"),
    "target_rope, llama": ({"next_pos": "target_rope", "own_pos": "rope", "block": "llama"}, "random"),
    "instruction, llama": ({"next_pos": "instruction", "own_pos": "rope", "block": "llama"}, "random"),
    "raster, gpt": ({"next_pos": "absolute", "own_pos": "learned", "block": "gpt"}, "raster"),
    "raster, llama": ({"next_pos": "none", "own_pos": "rope", "block": "llama"}, "raster"),  # LlamaGen
}


def settings(args) -> Settings:
    """bench_ar's settings (the preset's sizes, 8x8 grid, vocabulary 512) with the study's training batch, 64."""
    s = Settings.from_args(args)
    s.batch = 2 if args.smoke else 64
    return s


def variant(s: Settings, device, **kwargs) -> OrderedTransformer:
    torch.manual_seed(0)  # every variant starts from the same draws
    return OrderedTransformer(s.vocab, (s.grid, s.grid), s.num_classes, s.width, s.depth, s.heads, s.mlp_ratio,
                              **kwargs).to(device)


def params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def bench(s: Settings, device, dtype: str) -> list[Row]:
    tokens = torch.randint(s.vocab, (s.batch, s.grid**2), generator=torch.Generator().manual_seed(0)).to(device)
    cond = torch.arange(s.batch, device=device) % s.num_classes
    b, n = tokens.shape
    ctx = autocast(device, dtype)
    orders = {"random": lambda: random_order(b, n, device=device), "raster": lambda: raster_order(b, n, device=device)}
    nets = {name: variant(s, device, **kwargs) for name, (kwargs, _) in VARIANTS.items()}
    steps, samplers = {}, {}
    for name, (_, order) in VARIANTS.items():
        net = nets[name]
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        loss = ordered_loss(net, tokens, cond, orders[order])
        steps[name] = lambda net=net, opt=opt, loss=loss: train_step(net, opt, loss, ctx)
        policy = "raster" if order == "raster" else "random"
        samplers[name] = {p: _sampler(net.eval(), cond[: s.sample_batch], p, 2, contextlib.nullcontext(),
                                      dtype=torch.float32 if dtype == "fp32" else torch.bfloat16)
                          for p in {policy, "confidence" if net.knows_next_cell else policy}}
        net.train()
    base_name = next(iter(VARIANTS))
    base_params = params(nets[base_name])
    rows = []
    for name in list(VARIANTS)[1:]:
        extra = {"params": params(nets[name]), "params_share": params(nets[name]) / base_params,
                 "default_params": base_params}
        raw: list[list[float]] = []
        ta, tb = time_alternately([steps[name], steps[base_name]], s.repeats, s.warmup, device, samples=raw)
        rows.append(Row(f"(v1) train step, {name} / default", f"{name} (b={b})", f"{base_name} (b={b})",
                        median_ratio(*raw), RATIO, "<=", 1.25, ta, tb, extra, *raw))
        order = VARIANTS[name][1]
        policy = "raster" if order == "raster" else "random"
        for row, p in (("(v2)", policy), ("(v3)", "confidence"))[: 2 if order == "random" else 1]:
            base_policy = "random" if p == "raster" else p  # raster sampling is timed against random order
            fns = [lambda name=name, p=p: samplers[name][p](),
                   lambda p=base_policy: samplers[base_name][p]()]
            with torch.no_grad():
                ta, tb = time_alternately(fns, s.repeats, s.warmup, device, samples=raw)
            rows.append(Row(f"{row} {p} sampling, {name} / default", f"{name}, {p} (b={s.sample_batch})",
                            f"{base_name}, {base_policy} (b={s.sample_batch})", median_ratio(*raw), RATIO, "<=",
                            1.25 if row == "(v2)" else 2.0, ta, tb, {}, *raw))
    return rows


def main(argv: list[str] | None = None) -> list[Row]:
    args = common_parser(__doc__.splitlines()[0]).parse_args(argv)
    device = setup_torch(args)
    s = settings(args)
    config = {"preset": "smoke" if args.smoke else args.preset, "width": s.width, "depth": s.depth, "heads": s.heads,
              "grid": f"{s.grid}x{s.grid}", "vocab": s.vocab, "batch": s.batch, "repeats": s.repeats,
              **environment(args, device)}
    rows = []
    for dtype in args.dtype:
        for row in bench(s, device, dtype):
            row.name, row.extra["dtype"] = f"{row.name} [{dtype}]", dtype
            rows.append(row)
    notes = ["ratio = median over repeats of A/B timed back to back (alternating)",
             f"1-minute load average at start {config['load_at_start']}, at end {load()}"]
    report(config, rows, args.json, notes)
    return rows


if __name__ == "__main__":
    main()
