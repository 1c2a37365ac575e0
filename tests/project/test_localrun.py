"""`make up`'s serving processes (tunehouse.localrun): SERVING_PROCESSES ports and the SERVING_URL list."""

import pytest

from apps.endpoints.routing import serving_urls
from tunehouse.localrun import serving_ports, serving_url_list


def test_one_serving_process_keeps_serving_port():
    assert serving_ports(1, first_port=8100) == [8100]
    assert serving_url_list([8100]) == "http://127.0.0.1:8100"


def test_several_serving_processes_get_distinct_free_ports_and_one_url_list():
    ports = serving_ports(3, first_port=8100)
    assert ports[0] == 8100 and len(set(ports)) == 3
    assert serving_urls(serving_url_list(ports)) == tuple(f"http://127.0.0.1:{port}" for port in ports)


def test_serving_processes_must_be_at_least_one():
    with pytest.raises(ValueError, match="SERVING_PROCESSES"):
        serving_ports(0, first_port=8100)
