"""Speed benchmarks, printed as tables: `python -m benchmarks.bench_ar`, `bench_extraction`, `bench_precision`,
`bench_variants`, `bench_agreement`, `profile_decode` (see each module docstring; `harness.py` is their plumbing).
The order study (quality, not speed) is the `experiments` package."""
