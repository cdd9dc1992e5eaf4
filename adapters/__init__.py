"""Adapters: the only code that knows a serving framework.

`inferline.adapters.base` is the framework-agnostic interface the agent, the profiler and the
router use; `inferline.adapters.registry` finds adapters by name through the entry-point group
`inferline.adapters`. Each framework lives in its own subpackage and imports its client library
only there, so the default install needs none of them.
"""
