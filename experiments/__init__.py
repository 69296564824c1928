"""The order study's experiment runner and its experiment files: `python -m experiments experiments/<file>.yaml`.

- `spec.py`: the typed experiment file (`Experiment`, `Budget`, `Model`, `Arm`, `Pinned`), `checks.py` its checks;
- `plan.py`: its stages as keyed jobs (tokenizer -> AR fits -> order extraction -> distillation -> evaluation);
- `jobs.py`, `scheduler.py`: a job's key, resumption and `done.json`; running them, stopping them on a signal;
- `evaluate.py`: the evaluation jobs (`python -m experiments.evaluate`), `report/`: the report of a run;
- `artefacts.py`: the shared artefacts (tokenizer, feature network) published beside the results, and pinned;
- `machine.py`: the processor kind each stage records;
- `compare_orders.py` (the paper's table in one command), `editing.py` (the editing table), `order_content.py`.

The speed benchmarks are in `benchmarks/` (`python -m benchmarks.bench_ar` ...).
"""
