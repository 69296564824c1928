"""The report of an experiment run, in one place: `write.py` assembles `report.md` / `report.json` from what
`evals.py` reads, with the tables of `tables.py` and the figures of `figures.py`."""

from experiments.report.write import write_report

__all__ = ["write_report"]
