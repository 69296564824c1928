"""`python -m experiments FILE ...`: the experiment runner (`experiments/runner.py`)."""

from experiments.runner import main

main()
