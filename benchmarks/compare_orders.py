"""The quickstart's command, kept where the README has always put it: `python benchmarks/compare_orders.py --quick`
runs `experiments.compare_orders` (the package the experiment runner lives in; installed by `pip install -e .`)."""

from experiments.compare_orders import main

if __name__ == "__main__":
    main()
