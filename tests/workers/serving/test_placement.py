"""Warm-replica placement over several serving processes (workers/serving/placement.py), without processes."""

from workers.serving.placement import advertised_url_mismatch, keeps_warm_replica, rendezvous_order

URLS = {"http://a:8100", "http://b:8100", "http://c:8100"}


def test_only_the_first_min_replicas_processes_of_the_ranking_keep_it_warm():
    order = rendezvous_order("ep-x", URLS)
    for min_replicas in (1, 2, 3):
        warm = {
            url
            for url in URLS
            if keeps_warm_replica(endpoint="ep-x", min_replicas=min_replicas, own_url=url, live_urls=URLS)
        }
        assert warm == set(order[:min_replicas])


def test_on_demand_endpoints_are_warm_nowhere():
    assert not any(keeps_warm_replica(endpoint="ep-x", min_replicas=0, own_url=url, live_urls=URLS) for url in URLS)


def test_a_process_that_cannot_be_placed_keeps_a_replica_as_a_single_process_does():
    assert keeps_warm_replica(endpoint="ep-x", min_replicas=1, own_url="", live_urls=URLS)
    assert keeps_warm_replica(endpoint="ep-x", min_replicas=1, own_url="http://new:8100", live_urls=URLS)


def test_a_lost_process_hands_its_warm_replica_to_the_next_in_the_ranking():
    first, second, _third = rendezvous_order("ep-x", URLS)
    remaining = URLS - {first}
    assert keeps_warm_replica(endpoint="ep-x", min_replicas=1, own_url=second, live_urls=remaining)


def test_an_advertised_url_missing_from_serving_url_is_named_with_the_fix():
    listed = "http://10.0.0.1:8100, http://10.0.0.2:8100/"
    assert advertised_url_mismatch("http://10.0.0.2:8100", listed) is None  # trailing slash and spaces don't matter
    problem = advertised_url_mismatch("http://serving-2:8100", listed)
    assert "http://serving-2:8100" in problem and "SERVING_ADVERTISE_URL" in problem
    # Nothing to compare: a single process, or a process that does not know its URL, keeps warm replicas itself.
    assert advertised_url_mismatch("http://serving-2:8100", "") is None
    assert advertised_url_mismatch("", listed) is None
