"""The router's index of which worker holds which KV block, against a plain model of it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tokenmill.router.kv_index import KVIndex

WORKERS = ["http://a", "http://b", "http://c"]
HASHES = st.lists(st.integers(0, 30), max_size=12)
EVENT = st.one_of(
    st.tuples(st.just("BlockStored"), st.sampled_from(WORKERS), HASHES),
    st.tuples(st.just("BlockRemoved"), st.sampled_from(WORKERS), HASHES),
    st.tuples(st.just("AllCleared"), st.sampled_from(WORKERS), st.just([])),
    st.tuples(st.just("CachedBlocks"), st.sampled_from(WORKERS), HASHES),
    st.tuples(st.just("forget"), st.sampled_from(WORKERS), st.just([])),
)


@given(st.lists(EVENT, max_size=60), st.lists(st.integers(0, 30), max_size=20))
def test_matches_equal_the_leading_run_each_worker_holds(events, prompt):
    index, held = KVIndex(), {w: set() for w in WORKERS}
    for kind, url, hashes in events:
        if kind == "forget":
            index.forget(url)
        else:
            index.apply(url, {"type": kind, "block_hashes": hashes})
        if kind == "BlockStored":
            held[url] |= set(hashes)
        elif kind == "BlockRemoved":
            held[url] -= set(hashes)
        elif kind == "CachedBlocks":
            held[url] = set(hashes)
        else:
            held[url] = set()
    expected = {}
    for w in WORKERS:
        n = 0
        while n < len(prompt) and prompt[n] in held[w]:
            n += 1
        expected[w] = n
    assert index.matched_blocks(prompt, WORKERS) == expected
    assert all(index.num_blocks(w) == len(held[w]) for w in WORKERS)
    for w in WORKERS:  # forgetting everyone leaves nothing behind
        index.forget(w)
    assert index._holders == {} and index._blocks == {}


@given(st.lists(st.tuples(st.sampled_from(WORKERS), st.lists(st.integers(0, 9), max_size=8)), max_size=20))
def test_expectations_settle_to_nothing(sent):
    index = KVIndex()
    for url, hashes in sent:
        index.expect(url, hashes)
    for url, hashes in sent:
        assert index.matched_blocks(hashes, [url])[url] == len(hashes)
    for url, hashes in sent:
        index.settle(url, hashes)
    assert index._expected == {}


def test_a_worker_only_matches_among_the_workers_asked_about():
    index = KVIndex()
    index.apply("http://a", {"type": "BlockStored", "block_hashes": [1, 2, 3]})
    index.apply("http://b", {"type": "BlockStored", "block_hashes": [1, 2]})
    assert index.matched_blocks([1, 2, 3, 4], ["http://a", "http://b"]) == {"http://a": 3, "http://b": 2}
    assert index.matched_blocks([1, 2, 3], ["http://b"]) == {"http://b": 2}
    assert index.matched_blocks([], ["http://a"]) == {"http://a": 0}
