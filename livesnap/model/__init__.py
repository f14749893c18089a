"""The pure model: the snapshot tree and the planner (no I/O anywhere in this package)."""
