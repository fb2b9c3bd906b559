"""The token log: generated tokens by state slot, written for many slots at once and taken per slot in order."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from lstmserve.server.token_log import RESPONSES_PER_ROUND, TokenLog


def started(log: TokenLog, slot: int, max_tokens: int = 100, *, coalesce: bool = False) -> None:
    assert log.owner(slot) is None
    log.claim(slot, f"generation {slot}", max_tokens, coalesce=coalesce)


@settings(max_examples=40, deadline=None)
@given(batches=st.lists(st.integers(0, 7), min_size=1, max_size=30), width=st.sampled_from([1, 3, 8]))
def test_tokens_come_back_in_order_with_their_steps_and_batch_sizes_across_the_row_end(
    batches: list[int], width: int
) -> None:
    """Each batch records a token for slots 0, 2 and 5, and slot 2's stream takes after every `n`-th batch (0:
    never): whatever it takes is what was recorded, oldest first, as long as it never holds more than the width."""
    log = TokenLog(width=width)
    for slot in (0, 2, 5):
        started(log, slot)
    slots = np.array([0, 2, 5])
    recorded: list[tuple[int, int, int]] = []
    taken: list[tuple[int, int, int]] = []
    for batch, take_every in enumerate(batches):
        if log.backlog(slots)[1] == width:  # what the batcher does with a full row: the stream's tokens move out
            taken.extend(zip(*log.take(2)))
        tokens, steps = np.array([10, 20, 50]) + batch, np.array([100, 200, 500]) + batch
        log.record(slots, tokens, steps, batch_size=batch + 1)
        recorded.append((20 + batch, 200 + batch, batch + 1))
        if take_every and batch % take_every == 0:
            taken.extend(zip(*log.take(2)))
    taken.extend(zip(*log.take(2)))
    assert taken == recorded
    assert log.take(2) == ([], [], []) and log.made[2] == len(batches) and log.backlog(slots)[1] == 0


def test_a_single_record_and_a_batch_record_share_the_row() -> None:
    log = TokenLog(width=4)
    started(log, 3)
    log.record_one(3, 7, 11, 1)
    log.record(np.array([3]), np.array([8]), np.array([12]), 64)
    assert log.take(3) == ([7, 8], [11, 12], [1, 64])


def test_streams_are_due_at_every_token_until_they_take_one_then_at_their_share_when_coalescing() -> None:
    log = TokenLog(width=8)
    started(log, 0, coalesce=True)
    started(log, 1, coalesce=False)
    both = np.array([0, 1])
    generating = 3 * RESPONSES_PER_ROUND  # a coalescing stream's share: 3 tokens a response
    assert log.due(both, generating).tolist() == [False, False]  # nothing made yet
    log.record(both, np.array([1, 1]), np.array([1, 1]), 2)
    assert log.due(both, generating).tolist() == [True, True]  # the first token goes out at once
    log.take(0), log.take(1)
    log.record(both, np.array([2, 2]), np.array([2, 2]), 2)
    assert log.due(both, generating).tolist() == [False, True]
    log.record(both, np.array([3, 3]), np.array([3, 3]), 2)
    log.record(both, np.array([4, 4]), np.array([4, 4]), 2)
    assert log.due(both, generating).tolist() == [True, True]
    assert [log.due_one(slot, generating) for slot in (0, 1)] == [True, True]
    assert log.due(both, 10**6).tolist() == [False, True]  # at most half a row: 4 of 8
    log.record(both, np.array([5, 5]), np.array([5, 5]), 2)
    assert log.due(both, 10**6).tolist() == [True, True]


def test_a_slot_names_its_owner_until_released_and_grows_on_demand() -> None:
    log = TokenLog(width=2)
    assert log.owner(200) is None
    log.claim(200, "first", 5, coalesce=False)
    assert len(log.made) >= 201 and log.owner(200) == "first" and log.limit[200] == 5
    log.record_one(200, 1, 1, 1)
    log.claim(200, "second", 7, coalesce=True)  # starts the row afresh
    assert (log.owner(200), log.made[200], log.taken[200], log.limit[200]) == ("second", 0, 0, 7)
    log.release(200, "first")  # no longer the owner: nothing changes
    assert log.owner(200) == "second"
    log.release(200, "second")
    assert log.owner(200) is None and log.owner(10**6) is None
