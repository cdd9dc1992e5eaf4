"""Adapters: the only code that knows a serving framework (issue: Triton integration)."""
