"""Compare training runs (TensorBoard logs or tools/sweep summaries), grouped over seeds: figures of the
paper's comparisons + a summary table.

    python -m tools.report --runs a3po=runs/loglinear recompute=runs/recompute --out report/
    python -m tools.report --sweep docs/fidelity/runs --out docs/figures/fidelity
"""

from tools.report.report import (COMPARISONS, HEADLINES, SUMMARY_FILE, SUMMARY_SCHEMA, WINDOW, Group,  # noqa: F401
                                 ReportError, RunData, build_report, group_runs, load_run, load_sweep, main,
                                 max_drop, reduce_series)
