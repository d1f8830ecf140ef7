"""The simulated GPU cluster: one training step of a GPU recipe at its real layout (tools/simcluster/sim.py)."""
