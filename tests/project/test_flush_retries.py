"""The suite's own guard (tests/conftest.py, `_flush_with_retries`): a transactional test's flush that PostgreSQL
aborts (a deadlock with a worker) is tried again, so the next test still starts on an empty database instead of
finding the last one's rows. The two tests run in order: the first makes its flush fail once, the second checks."""

import pytest
from django.db import OperationalError, connection

from apps.tenancy.models import Tenant

pytestmark = pytest.mark.django_db(transaction=True)

flush_attempts: list[str] = []


def test_a_flush_that_fails_once_is_tried_again():
    Tenant.objects.create(slug="flushed", name="Flushed")
    flush_for_real = connection.ops.execute_sql_flush

    def fails_once(sql_list):
        flush_attempts.append("tried")
        if len(flush_attempts) == 1:
            raise OperationalError("a deadlock simulated by tests/project/test_flush_retries.py")
        return flush_for_real(sql_list)

    # Set on the instance (not monkeypatch, which is undone before the flush runs); the next test removes it.
    connection.ops.execute_sql_flush = fails_once


def test_the_next_test_starts_on_an_empty_database():
    del connection.ops.execute_sql_flush
    assert flush_attempts == ["tried", "tried"]
    assert not Tenant.objects.exists()
