"""Prometheus text exposition (Triton's /metrics) turned into flat numbers."""

from __future__ import annotations

import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from inferline.errors import ServerError


def parse_metrics(text: str) -> dict[str, float]:
    """`name{label="v",...}` -> value, labels sorted so keys are stable."""
    flat: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            flat[f"{sample.name}{{{labels}}}" if labels else sample.name] = float(sample.value)
    return flat


def fetch_metrics(url: str, timeout_s: float = 5.0) -> dict[str, float]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError) as exc:
        raise ServerError(
            f"cannot read metrics from {url}: {exc}", "check the server's metrics port (--metrics-port)"
        ) from exc
    return parse_metrics(text)
