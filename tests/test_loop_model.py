"""Model-based search: two nodes, hand-carried messages, any interleaving the network allows.

The network keeps each sender's messages to a recipient in order (SPEC §13, "Order"), but
now and then lets one overtake those in front of it, may deliver any message already
delivered once more at any later time, and holds messages
back for as long as it likes relative to the other direction (crossings). Operators
issue, cancel, replace and confirm at any moment; the Chair embargoes an origin or
suspends a Participant, and each node hears of it when it does; days pass (by 61 days
every certificate so far has expired) and each node's sweep expires open loops when it
runs. At the end every message
is delivered (unanswered certificates resent by the sweep), and both ends of every loop
must hold compatible states (tests/loopmodel.py COMPATIBLE), with nothing left to send,
and no node may raise.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.loopmodel import run


@pytest.fixture(autouse=True, scope="module")
def quiet() -> Iterator[None]:
    """Thousands of hand-carried loops: their log lines would only cost time."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    yield
    structlog.configure(**saved)

EXAMPLES = int(os.environ.get("KPX_MODEL_EXAMPLES", "400"))
index = st.integers(-2, 5)  # negative: the newest numbers
node = st.sampled_from(["BW", "BE"])


def actions(exporters: list[str], registry: bool) -> st.SearchStrategy[tuple[object, ...]]:
    ex = st.sampled_from(exporters)
    choices = [
        st.tuples(st.just("issue"), ex, st.booleans()),
        st.tuples(st.just("cancel"), ex, index),
        st.tuples(st.just("replace"), ex, index, st.booleans()),
        st.tuples(st.just("confirm"), ex, index, st.booleans()),
        st.tuples(st.just("publish"), node),
        st.tuples(st.just("publish"), node),
        st.tuples(st.just("deliver"), node, st.integers(1, 3), st.booleans()),
        st.tuples(st.just("deliver"), node, st.integers(1, 3), st.booleans()),
        st.tuples(st.just("duplicate"), node, st.integers(0, 29)),
        st.tuples(st.just("resend"), node),
        st.tuples(st.just("overtake"), node, st.integers(0, 9)),
        st.tuples(st.just("time"), st.sampled_from([1, 30, 61])),
        st.tuples(st.just("sweep"), node),
    ]
    if registry:
        choices += [st.tuples(st.just("chair"), st.sampled_from(["embargo", "BW", "BE"])),
                    st.tuples(st.just("registry_arrives"), node)]
    return st.one_of(choices)


SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def check(steps: list[tuple[object, ...]], both_ways: bool) -> None:
    model, problems = run(steps, both_ways=both_ways)
    try:
        assert not problems, "\n".join([*problems, "after:", *model.log])
    finally:
        model.close()


@SETTINGS
@given(st.lists(actions(["BW"], registry=False), min_size=8, max_size=40))
def test_one_loop_direction_converges(steps: list[tuple[object, ...]]) -> None:
    check(steps, both_ways=False)


@SETTINGS
@given(st.lists(actions(["BW", "BE"], registry=True), min_size=8, max_size=40))
def test_both_directions_with_registry_changes_converge(steps: list[tuple[object, ...]]) -> None:
    check(steps, both_ways=True)
