"""Schemathesis hooks (SCHEMATHESIS_HOOKS=tests.schemathesis_hooks): every generated
request may have one of its strings poisoned with a NUL or a lone surrogate, the text no
column can hold, so the fuzzing of every route also asks that such text is refused
at the door and never answered with a server error.

Lone surrogates go only into JSON bodies (as `\\ud800` escapes); a query string or a path
carries a NUL (`%00`), which is what the HTTP client can send there."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import schemathesis
from hypothesis import strategies as st

NUL = "\x00"
POISONS_IN_JSON = (NUL, "\ud800", "\udfff")
POISONS_IN_URL = (NUL,)
Path = tuple[Any, ...]


def _string_paths(value: Any, at: Path = ()) -> Iterator[Path]:
    """Where the strings in a JSON value are (keys and indexes from the top)."""
    if isinstance(value, str):
        yield at
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _string_paths(item, (*at, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _string_paths(item, (*at, index))


def _poison(value: Any, at: Path, poison: str, offset: int) -> Any:
    """A copy of `value` with `poison` put into the string at `at`."""
    if not at:
        text = str(value)
        cut = min(offset, len(text))
        return text[:cut] + poison + text[cut:]
    changed = copy.deepcopy(value)
    parent = changed
    for step in at[:-1]:
        parent = parent[step]
    parent[at[-1]] = _poison(parent[at[-1]], (), poison, offset)
    return changed


def poisoned(value: Any, poisons: tuple[str, ...]) -> st.SearchStrategy[Any]:
    """`value` as generated, or with one of its strings poisoned."""
    paths = list(_string_paths(value))
    if not paths:
        return st.just(value)
    return st.one_of(
        st.just(value),
        st.builds(
            lambda at, poison, offset: _poison(value, at, poison, offset),
            st.sampled_from(paths),
            st.sampled_from(poisons),
            st.integers(0, 64),
        ),
    )


@schemathesis.hook
def flatmap_body(context: Any, body: Any) -> st.SearchStrategy[Any]:
    return poisoned(body, POISONS_IN_JSON)


@schemathesis.hook
def flatmap_query(context: Any, query: Any) -> st.SearchStrategy[Any]:
    return poisoned(query, POISONS_IN_URL)


@schemathesis.hook
def flatmap_path_parameters(context: Any, path_parameters: Any) -> st.SearchStrategy[Any]:
    return poisoned(path_parameters, POISONS_IN_URL)
