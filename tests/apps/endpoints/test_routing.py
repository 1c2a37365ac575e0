"""Routing an endpoint's requests over several serving processes (apps/endpoints/routing.py), without processes."""

from collections import Counter

from apps.endpoints.routing import ServingPool, rendezvous_order, serving_urls

URLS = ("http://10.0.0.1:8100", "http://10.0.0.2:8100", "http://10.0.0.3:8100", "http://10.0.0.4:8100")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_serving_url_accepts_one_url_or_a_list():
    assert serving_urls("http://127.0.0.1:8100/") == ("http://127.0.0.1:8100",)
    assert serving_urls(" http://a:1 , http://b:2/,,http://a:1 ") == ("http://a:1", "http://b:2")
    assert serving_urls("") == ()


def test_rendezvous_order_is_stable_and_independent_of_the_list_order():
    for endpoint in (f"ep-{n}" for n in range(50)):
        order = rendezvous_order(endpoint, URLS)
        assert sorted(order) == sorted(URLS)
        assert rendezvous_order(endpoint, tuple(reversed(URLS))) == order
        assert rendezvous_order(endpoint, URLS) == order


def test_endpoints_spread_over_processes_and_losing_one_moves_only_its_endpoints():
    endpoints = [f"ep-{n}" for n in range(400)]
    first = {endpoint: rendezvous_order(endpoint, URLS)[0] for endpoint in endpoints}
    counts = Counter(first.values())
    assert set(counts) == set(URLS) and min(counts.values()) > 60  # about 100 each
    remaining = URLS[1:]
    for endpoint in endpoints:
        now_first = rendezvous_order(endpoint, remaining)[0]
        if first[endpoint] != URLS[0]:
            assert now_first == first[endpoint]  # untouched by the loss of another process
        else:
            assert now_first == rendezvous_order(endpoint, URLS)[1]  # its next choice takes it over


def test_candidates_start_with_the_top_process_and_list_every_other_by_rank():
    pool = ServingPool(URLS)
    assert pool.candidates("ep-a") == rendezvous_order("ep-a", URLS)
    assert pool.candidates("ep-a") == pool.candidates("ep-a")


def test_a_failed_process_is_skipped_for_its_backoff_then_tried_again():
    clock = FakeClock()
    pool = ServingPool(URLS, backoff_seconds=5, clock=clock)
    ranked = rendezvous_order("ep-a", URLS)
    pool.mark_failed(ranked[0])
    assert pool.candidates("ep-a") == [*ranked[1:], ranked[0]]  # still last: better a late try than none
    assert not pool.is_up(ranked[0])
    clock.now += 4.9
    assert pool.candidates("ep-a")[0] == ranked[1]
    clock.now += 0.2
    assert pool.candidates("ep-a") == ranked
    pool.mark_failed(ranked[0])
    pool.mark_up(ranked[0])  # it answered again (a try during its backoff, when all others failed)
    assert pool.candidates("ep-a") == ranked


def test_when_every_process_failed_all_are_still_tried_by_rank():
    pool = ServingPool(URLS, clock=FakeClock())
    for url in URLS:
        pool.mark_failed(url)
    assert pool.candidates("ep-a", spread=2) == rendezvous_order("ep-a", URLS)


def test_spread_sends_to_the_least_busy_of_the_top_processes():
    pool = ServingPool(URLS)
    ranked = rendezvous_order("ep-a", URLS)
    assert pool.candidates("ep-a", spread=2)[0] == ranked[0]  # idle: the top one, so one process holds the model
    pool.begin(ranked[0])
    assert pool.candidates("ep-a", spread=2) == [ranked[1], ranked[0], *ranked[2:]]
    assert pool.candidates("ep-a", spread=1)[0] == ranked[0]  # max_replicas 1: never another process while it is up
    pool.begin(ranked[1])
    assert pool.candidates("ep-a", spread=2)[0] == ranked[0]  # a tie again: the higher rank
    pool.begin(ranked[0])
    pool.begin(ranked[1])
    pool.begin(ranked[1])
    assert pool.candidates("ep-a", spread=2)[0] == ranked[0]  # 2 in flight against 3
    assert pool.candidates("ep-a", spread=3)[0] == ranked[2]  # the third process is idle
    for url in (ranked[0], ranked[0], ranked[1], ranked[1], ranked[1]):
        pool.end(url)
    assert [pool.in_flight(url) for url in URLS] == [0, 0, 0, 0]


def test_spread_counts_only_live_processes():
    pool = ServingPool(URLS, clock=FakeClock())
    ranked = rendezvous_order("ep-a", URLS)
    pool.mark_failed(ranked[0])
    with pool.counting(ranked[1]):
        assert pool.candidates("ep-a", spread=2)[0] == ranked[2]
    assert pool.candidates("ep-a", spread=2) == [ranked[1], ranked[2], ranked[3], ranked[0]]
