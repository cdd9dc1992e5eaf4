"""Keep Python's cyclic garbage collector from stalling a serving process.

A full collection walks every object the collector tracks while holding the GIL: about 100k
objects once the router's libraries are imported, 64 ms on a 2-core machine, during which no
replica hands a result on and no query is answered or sent. Measured through the router's
dispatch core, such pauses showed up as single calls of 90 ms among calls of 6-13 ms. Nearly
all of those objects (modules, clients, the router's structures) live as long as the process,
so once a server has started they are frozen out of the collector's reach; later collections
scan only what queries allocate (with the freeze, no full collection ran during a replay).
"""

from __future__ import annotations

import gc


def freeze_long_lived() -> None:
    """Collect what is garbage now, then exempt every surviving object from future collections."""
    gc.collect()
    gc.freeze()
