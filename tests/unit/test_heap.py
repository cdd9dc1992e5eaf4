"""Freezing long-lived objects takes them out of later collections (what keeps servers from stalling)."""

from __future__ import annotations

import gc
import weakref

from inferline.heap import freeze_long_lived


class Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the cyclic collector can free it


def test_garbage_is_collected_and_survivors_leave_the_collectors_scans() -> None:
    garbage = weakref.ref(Node())  # unreachable already: the freeze must free it, not keep it forever
    kept = [Node() for _ in range(1000)]
    try:
        freeze_long_lived()
        assert garbage() is None
        assert gc.get_freeze_count() >= len(kept)
        scanned = {id(o) for o in gc.get_objects()}  # what a collection walks: frozen objects are not in it
        assert not any(id(node) in scanned for node in kept)
    finally:
        gc.unfreeze()
