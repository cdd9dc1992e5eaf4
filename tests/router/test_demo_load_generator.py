"""The demo's load generator shares its process with the router's frontends: a Ctrl-C mid-replay,
with queries in flight, must close it without printing anything.

grpc.aio delivers every call's events through whichever of a process's event loops wakes first; a
gRPC client on the replay's loop beside the gRPC frontend's loop printed one "Event loop is closed"
traceback per cancelled call once the replay's loop had closed (one CI run of the demo's Ctrl-C
test). The script below runs the demo's load generator, as `load_generator_target` configures it,
against both frontends of a slow fake router, and interrupts it as a terminal would.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
IN_FLIGHT = 300

SCRIPT = f"""
import asyncio, os, signal, time
import numpy as np
from inferline.deployment import Endpoints
from inferline.live_demo import load_generator_target
from inferline.replay_command import replay_against
from inferline.router.grpc_frontend import serve_grpc
from inferline.router.http_frontend import serve_http
from tests.router.fake_router import FAKE_NAME, FakeRouter

fake = FakeRouter(FAKE_NAME, delay_s=5.0)  # every query stays in flight until the interrupt
grpc_frontend = serve_grpc(fake, "127.0.0.1", 0, max_wait_s=5.0)
http_frontend = serve_http(fake, "127.0.0.1", 0, max_wait_s=5.0)
endpoints = Endpoints(grpc_frontend.address, http_frontend.address, http_frontend.url + "/metrics")
target = load_generator_target(endpoints, FAKE_NAME, None, None, "none", 2.0)
arrivals = np.linspace(0.0, 0.2, {IN_FLIGHT})

async def interrupt_once_all_are_in_flight():
    deadline = time.monotonic() + 30.0
    while len(fake.received) < {IN_FLIGHT} and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    os.kill(os.getpid(), signal.SIGINT)

async def main():
    # Ctrl-C once the router has every query and has answered none.
    watcher = asyncio.create_task(interrupt_once_all_are_in_flight())
    await replay_against(target, arrivals, 100.0, fake.input_specs(), 10.0, 0)
    await watcher

try:
    asyncio.run(main())
    print("not interrupted")
except KeyboardInterrupt:
    pass
print("received", len(fake.received))
time.sleep(5.5)  # the router answers the abandoned queries meanwhile
http_frontend.stop()
grpc_frontend.stop()
"""


def test_ctrl_c_mid_replay_in_the_routers_process_prints_nothing() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["received", str(IN_FLIGHT)], done.stdout  # all were in flight
    assert done.stderr == "", done.stderr[-3000:]
