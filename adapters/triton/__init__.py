"""NVIDIA Triton Inference Server: the adapter (tritonclient) and an embedded server manager.

Needs the `[triton]` extras (tritonclient, and nvidia-pytriton for the bundled `tritonserver`).
"""

from inferline.adapters.triton.adapter import TritonAdapter, connect

__all__ = ["TritonAdapter", "connect"]
