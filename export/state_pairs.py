"""Which graph output carries each state input forward: pairs by name, then by shape. Pure functions.

A state input `h` pairs with the output that names the same state: `h0 -> hn`, `state -> state_out`,
`past_x -> present_x`, `cache_last_channel -> cache_last_channel_next`. Names are compared by their
stems, never by sort order (Triton pairs implicit states by sorted names and swaps
`cache_last_channel_next` with `cache_last_channel_len_next`: triton-inference-server/server#8586).
Inputs left without a name match pair with the one remaining output of the same shape; two or more
candidates is an ambiguity the user settles with `--state IN:OUT`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from lstmserve.export.errors import ExportError
from lstmserve.interface import GraphTensor, show_shape

#: Affixes that mark a tensor as a state going in, or coming out, stripped to find its stem.
INPUT_SUFFIXES = ("_in", "_input", "_prev", "_previous", "_past", "_init", "_initial", "_0", "0", ".in")
INPUT_PREFIXES = ("in_", "input_", "prev_", "previous_", "past_", "init_", "initial_")
OUTPUT_SUFFIXES = ("_out", "_output", "_next", "_new", "_final", "_n", "n", ".out", "_last")
OUTPUT_PREFIXES = ("out_", "output_", "next_", "new_", "final_", "present_")


@dataclass(frozen=True)
class StatePair:
    """One recurrent state: the input that carries it in and the output that carries it out.

    Args:
        input: the graph input.
        output: the graph output.
        how: "given" (--state), "name" or "shape".
    """

    input: GraphTensor
    output: GraphTensor
    how: str


def stems(name: str, prefixes: Sequence[str], suffixes: Sequence[str]) -> set[str]:
    """The name (lower-cased) and what is left of it after removing each affix it has."""
    lowered = name.lower()
    found = {lowered}
    for prefix in prefixes:
        if lowered.startswith(prefix) and len(lowered) > len(prefix):
            found.add(lowered[len(prefix):])
    for suffix in suffixes:
        if lowered.endswith(suffix) and len(lowered) > len(suffix):
            found.add(lowered[: -len(suffix)])
    return found


def same_shape(a: GraphTensor, b: GraphTensor) -> bool:
    """Same dtype and rank, equal fixed sizes (a fixed size never equals a dynamic one)."""
    if a.dtype != b.dtype or len(a.shape) != len(b.shape):
        return False
    for x, y in zip(a.shape, b.shape):
        if isinstance(x, int) != isinstance(y, int) or (isinstance(x, int) and x != y):
            return False
    return True


def pair_states(
    inputs: Sequence[GraphTensor],
    outputs: Sequence[GraphTensor],
    given: Sequence[tuple[str, str]] = (),
) -> list[StatePair]:
    """Pairs state inputs with outputs: the `given` (input, output) names first, then by name, then by shape.

    `inputs` and `outputs` are the candidates (the data input and output left out when known).
    Returns the pairs in the order of `inputs`; ExportError names an unknown name or an ambiguity.
    """
    by_in = {t.name: t for t in inputs}
    by_out = {t.name: t for t in outputs}
    pairs: dict[str, StatePair] = {}
    used: set[str] = set()
    for in_name, out_name in given:
        if in_name not in by_in:
            raise ExportError(f"--state {in_name}:{out_name}: {in_name!r} is not a graph input ({_names(inputs)})")
        if out_name not in by_out:
            raise ExportError(f"--state {in_name}:{out_name}: {out_name!r} is not a graph output ({_names(outputs)})")
        if in_name in pairs or out_name in used:
            raise ExportError(f"--state {in_name}:{out_name} names a tensor that another --state already pairs")
        if not same_shape(by_in[in_name], by_out[out_name]):
            raise ExportError(
                f"--state {in_name}:{out_name}: {in_name!r} {show_shape(by_in[in_name].shape)} and {out_name!r} "
                f"{show_shape(by_out[out_name].shape)} differ in dtype or shape, so one cannot carry the other"
            )
        pairs[in_name] = StatePair(by_in[in_name], by_out[out_name], "given")
        used.add(out_name)
    _pair_by_name(inputs, outputs, pairs, used)
    _pair_by_shape(inputs, outputs, pairs, used)
    return [pairs[t.name] for t in inputs if t.name in pairs]


def _pair_by_name(
    inputs: Sequence[GraphTensor], outputs: Sequence[GraphTensor], pairs: dict[str, StatePair], used: set[str]
) -> None:
    """Pairs an input and an output when each is the other's only name match."""
    free_in = [t for t in inputs if t.name not in pairs]
    free_out = [t for t in outputs if t.name not in used]
    out_stems = {t.name: stems(t.name, OUTPUT_PREFIXES, OUTPUT_SUFFIXES) for t in free_out}
    candidates: dict[str, list[GraphTensor]] = {}
    for tensor in free_in:
        in_stems = stems(tensor.name, INPUT_PREFIXES, INPUT_SUFFIXES)
        found = [o for o in free_out if in_stems & out_stems[o.name]]
        # An output whose stem is this input's whole name wins (`x` -> `x_next` over `x_len_next`).
        exact = [o for o in found if tensor.name.lower() in out_stems[o.name]]
        candidates[tensor.name] = exact or found
    claimed = Counter(o.name for found in candidates.values() for o in found)
    for tensor in free_in:
        found = candidates[tensor.name]
        if len(found) != 1 or claimed[found[0].name] != 1:
            continue  # no match, or several: left to the shapes, or to --state
        output = found[0]
        if not same_shape(tensor, output):
            continue  # alike in name only (`x_in` -> `x_out` data, say): not a state
        pairs[tensor.name] = StatePair(tensor, output, "name")
        used.add(output.name)


def _pair_by_shape(
    inputs: Sequence[GraphTensor], outputs: Sequence[GraphTensor], pairs: dict[str, StatePair], used: set[str]
) -> None:
    free_in = [t for t in inputs if t.name not in pairs]
    free_out = [t for t in outputs if t.name not in used]
    for tensor in free_in:
        found = [o for o in free_out if same_shape(tensor, o)]
        rivals = [i for i in free_in if i is not tensor and any(same_shape(i, o) for o in found)]
        if not found:
            continue
        if len(found) > 1 or rivals:
            others = [tensor.name, *(r.name for r in rivals)]
            raise ExportError(
                f"ambiguous state pairs: input{'s' if len(others) > 1 else ''} {', '.join(map(repr, others))} "
                f"could pair with output{'s' if len(found) > 1 else ''} {', '.join(repr(o.name) for o in found)} "
                f"(same shape {show_shape(tensor.shape)}); name the pairs with --state IN:OUT"
            )
        pairs[tensor.name] = StatePair(tensor, found[0], "shape")
        used.add(found[0].name)
        free_out.remove(found[0])


def _names(tensors: Sequence[GraphTensor]) -> str:
    return ", ".join(repr(t.name) for t in tensors) or "none"
