"""Fixtures shared by the frontend and client tests: one fake router per module, served over HTTP."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from inferline.router.http_frontend import HttpFrontend, serve_http
from tests.router.fake_router import FAKE_NAME, FakeRouter


@pytest.fixture(scope="module")
def fake() -> FakeRouter:
    return FakeRouter(FAKE_NAME)


@pytest.fixture(scope="module")
def http_frontend(fake: FakeRouter) -> Iterator[HttpFrontend]:
    frontend = serve_http(fake, "127.0.0.1", 0, max_wait_s=5.0)
    yield frontend
    frontend.stop()
