"""Compare training runs from their TensorBoard logs: figures of the paper's comparisons + a summary table.

    python -m tools.report --runs a3po=runs/loglinear recompute=runs/recompute --out report/
"""

from tools.report.report import (COMPARISONS, HEADLINES, ReportError, RunData, build_report, load_run,  # noqa: F401
                                 main)
