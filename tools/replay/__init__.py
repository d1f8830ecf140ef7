"""Check that two runs' step records are bit-identical (a replayed run against the run it replays).

    python -m tools.replay RUN_A RUN_B [--steps N]
"""
