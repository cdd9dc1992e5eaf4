"""Tuner policies: pure `decide(ctx, state) -> (decisions, state)` functions, simulated and live alike."""
