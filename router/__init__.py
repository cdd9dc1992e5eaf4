"""The data plane: pipeline endpoint and per-stage queues (issue: live pipelines)."""
