"""The sidecar agent next to each model server (issue: Triton integration)."""
