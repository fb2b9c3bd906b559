"""Stop strings: finds them in generated text as it streams, in time that does not grow with their number.

`StopMatcher` runs an Aho-Corasick automaton over the characters of each generated token: one state
transition per character (amortised), whatever the number of stop strings. The automaton's state is
the longest end of the text so far that could still begin a stop string, which is exactly the text
to hold back until it is known not to be one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence


class StopAutomaton:
    """An Aho-Corasick automaton over the stop strings (built once per generation request with stop strings).

    State 0 is the root (nothing matched). For each state: its children by character, its failure link
    (the state of its longest proper suffix that is also a prefix of some stop string), its depth (the
    length of that prefix), and the length of the longest stop string that ends there (0: none).
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.children: list[dict[str, int]] = [{}]
        self.depth: list[int] = [0]
        self.match_length: list[int] = [0]
        for stop in stops:
            state = 0
            for char in stop:
                child = self.children[state].get(char)
                if child is None:
                    child = len(self.children)
                    self.children[state][char] = child
                    self.children.append({})
                    self.depth.append(self.depth[state] + 1)
                    self.match_length.append(0)
                state = child
            self.match_length[state] = len(stop)
        self.fail = [0] * len(self.children)
        queue = deque(self.children[0].values())
        while queue:  # breadth first: a state's failure link is settled before its children's
            state = queue.popleft()
            for char, child in self.children[state].items():
                self.fail[child] = self.next(self.fail[state], char)
                if not self.match_length[child]:
                    # A stop string that ends inside this one also ends here.
                    self.match_length[child] = self.match_length[self.fail[child]]
                queue.append(child)

    def next(self, state: int, char: str) -> int:
        """The state after reading `char` in `state`."""
        while True:
            child = self.children[state].get(char)
            if child is not None:
                return child
            if state == 0:
                return 0
            state = self.fail[state]


class StopMatcher:
    """Holds back text that could be the start of a stop string, and finds a stop string.

    `push` takes a token's text and returns the text pieces that are now safe to emit; `stopped`
    turns true when the generated text contains a stop string, and the text before it has then been
    released. If several stop strings occur in the same token's text, the one that starts first wins.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.stopped = False
        self._automaton = StopAutomaton(self.stops)
        self._state = 0
        self._held: deque[tuple[int, str]] = deque()
        self._held_chars = 0

    def push(self, token: int, text: str) -> list[tuple[int, str]]:
        """Adds a token; returns the (token, text) pairs that can be emitted now."""
        if not self.stops:
            return [(token, text)]
        automaton, state = self._automaton, self._state
        end = self._held_chars  # positions count from the start of the held text
        stop_at = -1
        for char in text:
            state = automaton.next(state, char)
            end += 1
            length = automaton.match_length[state]
            if length and (stop_at < 0 or end - length < stop_at):
                stop_at = end - length
        self._state = state
        self._held.append((token, text))
        self._held_chars = end
        if stop_at >= 0:
            self.stopped = True
            return self._release(stop_at)
        return self._release(end - automaton.depth[state])

    def flush(self) -> list[tuple[int, str]]:
        """Releases everything still held (when generation ends without a stop)."""
        released = list(self._held)
        self._held.clear()
        self._held_chars = 0
        return released

    def _release(self, chars: int) -> list[tuple[int, str]]:
        """Releases the held tokens that lie wholly within the first `chars` held characters (after a stop,
        also the part of the token that straddles it, and then drops the rest)."""
        released: list[tuple[int, str]] = []
        while self._held and chars > 0:
            token, text = self._held[0]
            if len(text) > chars:
                if self.stopped:  # a token that straddles the stop string: emit its part before it
                    released.append((token, text[:chars]))
                    self._held.popleft()
                break
            released.append(self._held.popleft())
            self._held_chars -= len(text)
            chars -= len(text)
        if self.stopped:
            self._held.clear()
            self._held_chars = 0
        return released
