"""The contract `ops/held.py` relies on: a batch written into a histogram through prometheus-client's internals
gives exactly the samples that `observe()` of each value gives. Runs at both ends of the declared range (`make
test` and `make floor-test`)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

from tang_server.ops.held import observe_all
from tang_server.ops.metrics import BUCKETS


def _histogram() -> tuple[CollectorRegistry, Histogram]:
    registry = CollectorRegistry()
    return registry, Histogram("duration_seconds", "d", ["route"], buckets=BUCKETS, registry=registry)


def _samples(registry: CollectorRegistry) -> list[tuple[str, dict[str, str], float]]:
    return [
        (sample.name, sample.labels, sample.value)
        for family in registry.collect()
        for sample in family.samples
        if not sample.name.endswith("_created")  # creation times differ by when each was made
    ]


# Bounds themselves, their neighbours and anything from zero to past the last bound.
_values = st.lists(
    st.one_of(
        st.sampled_from(BUCKETS),
        st.sampled_from(BUCKETS).map(lambda bound: bound * (1 + 1e-12)),
        st.floats(min_value=0, max_value=20, allow_nan=False),
    ),
    max_size=200,
)


@given(_values)
def test_a_batch_is_exactly_what_observe_of_each_value_gives(values: list[float]) -> None:
    batched_registry, batched = _histogram()
    observed_registry, observed = _histogram()
    child = observed.labels("/adv")
    observe_all(batched.labels("/adv"), values)
    for value in values:
        child.observe(value)
    assert _samples(batched_registry) == _samples(observed_registry)


def test_batches_add_to_what_is_already_there() -> None:
    batched_registry, batched = _histogram()
    observed_registry, observed = _histogram()
    child = observed.labels("/rec/{thp}")
    for batch in ([0.00005, 0.3], [], [5.0, 7.5, 0.0001]):
        observe_all(batched.labels("/rec/{thp}"), batch)
        for value in batch:
            child.observe(value)
    batched_samples, observed_samples = _samples(batched_registry), _samples(observed_registry)
    assert [sample[:2] for sample in batched_samples] == [sample[:2] for sample in observed_samples]
    # The sum is added per batch, not per value: the same up to rounding.
    assert [sample[2] for sample in batched_samples] == pytest.approx([sample[2] for sample in observed_samples])
