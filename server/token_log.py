"""The tokens that running generations made and their streams have not taken yet, in arrays indexed by state slot.

A slot's row belongs to one generation at a time, its owner: the session's generation, once its prompt
has run. The batching loop writes the tokens of a whole batch of generations with a few array operations
(`record`), reads which generations ended or have tokens to send from the counters (`made`, `limit`,
`backlog`), and the streaming coroutine of each generation takes its tokens (`take`). Generations with
stop strings keep their tokens in their stop matcher instead, and a second generation queued on a session
while its first still runs keeps them in a log of its own (see `Generation.attach`).

Each slot keeps the last `width` tokens made and not taken: a stream that falls that far behind has its
tokens moved out to a list of its generation first (`Generation.keep_backlog`), so nothing is overwritten.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# With coalescing, a generation hands its tokens to the streaming coroutine in chunks sized so
# that N generating sessions send about this many responses per token each makes: a response
# costs the event loop tens of microseconds, so one response per token per session would make
# gRPC, not the model, the limit. A session generating alone still gets every token at once.
RESPONSES_PER_ROUND = 32

# Tokens kept per slot before the batching loop moves them out to their generation's list: 128 int64
# tokens, steps and batch sizes are 3 KiB per slot up to the highest slot that generated, and the arrays
# grow by doubling (48 MiB once slot 10,000 of the default --max-sessions generated). A coalescing stream
# gets at most half a row per response.
LOG_WIDTH = 128


def coalesce_share(generating: int, width: int = LOG_WIDTH) -> int:
    """The tokens a coalescing stream waits for before a response (after its first) with `generating` streams
    running: a share of the round sized so that they send about RESPONSES_PER_ROUND responses per token each, at
    least 1 and at most half a row of `width` (so that a stream keeping up never has its tokens moved out)."""
    return max(1, min(-(-generating // RESPONSES_PER_ROUND), width // 2))


class TokenLog:
    """Per state slot: the tokens the slot's generation (its owner) made and not yet taken, with the step each token was
    fed at and the size of its batch, and how many tokens the generation made and may make.

    Args:
        width: tokens kept per slot before they must be taken or moved out.
    """

    def __init__(self, width: int = LOG_WIDTH) -> None:
        self.width = width
        self.entries = np.zeros((0, width, 3), dtype=np.int64)  # per slot and column: token, step, batch size
        self.made = np.zeros(0, dtype=np.int64)  # tokens made since the slot's generation began
        self.taken = np.zeros(0, dtype=np.int64)  # of which taken (or moved out) by the stream
        self.limit = np.zeros(0, dtype=np.int64)  # the generation's max_tokens
        self.coalesce = np.zeros(0, dtype=bool)  # whether the generation's responses may carry several tokens
        self.owners: list[Any] = []  # the generation each slot's row belongs to (None: none yet)

    def owner(self, slot: int) -> Any:
        """The generation the slot's row belongs to (None if none)."""
        return self.owners[slot] if slot < len(self.owners) else None

    def claim(self, slot: int, owner: Any, max_tokens: int, *, coalesce: bool) -> None:
        """Gives the slot's row to `owner`, a generation of at most `max_tokens` tokens, and starts it afresh (the
        caller has moved the previous owner's tokens out)."""
        if slot >= len(self.made):
            self._grow(slot + 1)
        self.owners[slot] = owner
        self.made[slot] = self.taken[slot] = 0
        self.limit[slot] = max_tokens
        self.coalesce[slot] = coalesce

    def release(self, slot: int, owner: Any) -> None:
        """Forgets `owner` as the slot's generation, if it still is (so that the log does not keep it alive)."""
        if self.owners[slot] is owner:
            self.owners[slot] = None

    def due(self, slots: np.ndarray, generating: int) -> np.ndarray:
        """Which of `slots` have tokens enough to make a response now: any token without coalescing or before the
        stream took its first; with coalescing, a share of the round sized so that `generating` streams send
        about RESPONSES_PER_ROUND responses per token each, at most half a row (so that a stream keeping up
        never has its tokens moved out)."""
        return self.backlog(slots) >= np.where(self.coalesce[slots] & (self.taken[slots] > 0), self._share(generating), 1)

    def due_one(self, slot: int, generating: int) -> bool:
        """`due` for a single slot."""
        taken = int(self.taken[slot])
        held = int(self.made[slot]) - taken
        return held >= (self._share(generating) if self.coalesce[slot] and taken > 0 else 1)

    def _share(self, generating: int) -> int:
        """The tokens a coalescing stream gets per response with `generating` streams running."""
        return coalesce_share(generating, self.width)

    def record(self, slots: np.ndarray, tokens: np.ndarray, steps: np.ndarray, batch_size: int) -> None:
        """Logs one token for each of `slots` (distinct), fed at `steps`, in a batch of `batch_size`. The caller
        first moves out the backlog of slots whose rows are full (`backlog` equal to `width`)."""
        entries, column = self.entries, self.made[slots] % self.width
        entries[slots, column, 0] = tokens
        entries[slots, column, 1] = steps
        entries[slots, column, 2] = batch_size
        self.made[slots] += 1

    def record_one(self, slot: int, token: int, step: int, batch_size: int) -> None:
        """`record` for a single slot."""
        self.entries[slot, int(self.made[slot]) % self.width] = (token, step, batch_size)
        self.made[slot] += 1

    def backlog(self, slots: np.ndarray) -> np.ndarray:
        """How many tokens each of `slots` holds, made and not taken."""
        return self.made[slots] - self.taken[slots]

    def take(self, slot: int) -> tuple[list[int], list[int], list[int]]:
        """The slot's tokens not taken yet, oldest first, with the step each was fed at and its batch's size; they
        count as taken. Three flat lists: a list per token would be a container per token for the collector."""
        first, end = int(self.taken[slot]), int(self.made[slot])
        self.taken[slot] = end
        if first == end:
            return [], [], []
        start, stop = first % self.width, end % self.width or self.width
        row = self.entries[slot]
        entries = row[start:stop] if start < stop else np.concatenate([row[start:], row[:stop]])
        tokens, steps, sizes = entries.T.tolist()  # one conversion for the three
        return tokens, steps, sizes

    def _grow(self, slots: int) -> None:
        """Makes room for at least `slots` slots (doubling, so that growing one slot at a time stays cheap)."""
        size = max(slots, 2 * len(self.made))
        self.entries = _resized(self.entries, size)
        self.made, self.taken, self.limit = (_resized(a, size) for a in (self.made, self.taken, self.limit))
        self.coalesce = _resized(self.coalesce, size)
        self.owners.extend([None] * (size - len(self.owners)))


def _resized(array: np.ndarray, rows: int) -> np.ndarray:
    """`array` with `rows` rows: its own first, then zeros."""
    resized = np.zeros((rows, *array.shape[1:]), dtype=array.dtype)
    resized[: len(array)] = array
    return resized
