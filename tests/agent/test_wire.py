"""The agent's messages: profile settings and results survive the trip through protobuf."""

from __future__ import annotations

import pytest

from inferline.agent.profiler import ProfileSettings
from inferline.agent.wire import InvalidRequest, profile_from_json, result_to_pb, settings_from_pb, settings_to_pb
from inferline.profiles import parse_profile
from inferline.protos import agent_pb2


def test_settings_round_trip_and_unset_fields_take_the_profilers_defaults() -> None:
    asked = ProfileSettings(batch_sizes=(1, 4), warmup=2, samples=7, budget_s=3.0, drop_flat=True, idle_rounds=5)
    assert settings_from_pb(settings_to_pb("m", asked)) == asked
    bare = settings_from_pb(agent_pb2.ProfileRequest(model="m", batch_sizes=[1]))
    assert bare == ProfileSettings(batch_sizes=(1,))
    assert bare.idle_rounds == ProfileSettings.idle_rounds > 0


def test_negative_idle_rounds_are_refused_in_one_line() -> None:
    with pytest.raises(InvalidRequest, match="idle_rounds=-1") as caught:
        settings_from_pb(agent_pb2.ProfileRequest(model="m", batch_sizes=[1], idle_rounds=-1))
    assert "\n" not in str(caught.value)


def test_a_profiles_after_idle_term_reaches_the_client() -> None:
    profile = parse_profile(
        {
            "model": "m",
            "profiles": {"cpu": [{"batch_size": 1, "latency_ms": {"mean": 2.0}}]},
            "after_idle": {"cpu": {"extra_ms": 0.9, "time_constant_ms": 4.0}},
        },
        "test",
    )
    received = profile_from_json(result_to_pb(profile).result.profile_json, "the agent's result")
    assert received == profile and received is not None and received.after_idle_s("cpu") == (0.0009, 0.004)
