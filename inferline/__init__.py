"""InferLine: SLO-aware, cost-minimizing provisioning of multi-model inference pipelines."""

__version__ = "0.1.0"
