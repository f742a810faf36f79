"""UsageScanner on its own: it finds OpenRouter's usage however the stream is cut."""

from __future__ import annotations

import orjson

from qp.completions.usage import UsageScanner
from tests.fake_openrouter import STANDARD_STREAM

STREAM = b"".join(STANDARD_STREAM)


def scan(chunks: list[bytes]) -> tuple:
    scanner = UsageScanner()
    for chunk in chunks:
        scanner.feed(chunk)
    return scanner.prompt_tokens, scanner.completion_tokens, scanner.cost


def test_usage_is_found_whatever_the_single_cut():
    for cut in range(1, len(STREAM)):
        assert scan([STREAM[:cut], STREAM[cut:]]) == (12, 3, 0.00042), cut


def test_usage_is_found_byte_by_byte():
    assert scan([STREAM[i : i + 1] for i in range(len(STREAM))]) == (12, 3, 0.00042)


def test_a_stream_without_usage_leaves_it_unknown():
    assert scan([b'data: {"choices":[]}\n\n', b"data: [DONE]\n\n"]) == (None, None, None)


def test_usage_without_cost_keeps_the_tokens():
    line = b'data: {"usage":{"prompt_tokens":5,"completion_tokens":7}}\n\n'
    assert scan([line]) == (5, 7, None)


def test_an_overlong_line_is_skipped_and_the_usage_after_it_still_found():
    junk = [b"data: " + b"x" * (64 * 1024)] * 8  # 512 KiB without a newline
    line = b'\ndata: {"usage":{"prompt_tokens":5,"completion_tokens":7,"cost":1.5}}\n\n'
    assert scan([*junk, line]) == (5, 7, 1.5)


def test_usage_the_ledger_cannot_store_is_unknown():
    for prompt, completion, cost in [
        (2**64 - 1, 2**63, -1e-9),
        (-1, True, -0.5),
        ("12", 3.5, "0.1"),
        (None, [], {}),
    ]:
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "cost": cost}
        line = b"data: " + orjson.dumps({"usage": usage}) + b"\n\n"
        assert scan([line]) == (None, None, None), usage


def test_the_largest_storable_usage_is_kept():
    usage = {"prompt_tokens": 2**63 - 1, "completion_tokens": 0, "cost": 0}
    line = b"data: " + orjson.dumps({"usage": usage}) + b"\n\n"
    assert scan([line]) == (2**63 - 1, 0, 0.0)
