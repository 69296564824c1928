"""Speed and quality benchmarks, printed as tables (run the scripts; see each module docstring)."""
