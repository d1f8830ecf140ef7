"""Run a grid of recipe overrides x seeds (resumable, a few runs at a time) and summarise each run.

    python -m tools.sweep --grid tools/sweep/grids/fidelity.yaml --seeds 0,1,2 --out runs/fidelity --parallel 2
"""

from tools.sweep.sweep import RunSpec, Sweep, SweepError, build_summary, load_grid, main, read_steps  # noqa: F401
