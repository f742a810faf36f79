"""InflightBytes on its own: requests wait their turn, first come first served."""

from __future__ import annotations

import asyncio

import pytest

from qp.protection.inflight_bytes import InflightBytes


async def test_a_request_waits_until_the_bytes_it_asks_for_are_free():
    budget = InflightBytes(100)
    order: list[str] = []

    async def request(name: str, nbytes: int, seconds: float) -> None:
        async with budget.hold(nbytes):
            order.append(f"{name} in")
            await asyncio.sleep(seconds)
        order.append(f"{name} out")

    first = asyncio.create_task(request("big", 80, 0.05))
    await asyncio.sleep(0)
    second = asyncio.create_task(request("second", 95, 0))
    third = asyncio.create_task(request("small", 10, 0))  # fits now, but waits its turn
    await asyncio.gather(first, second, third)
    assert order == ["big in", "big out", "second in", "second out", "small in", "small out"]
    assert budget.in_use == 0


async def test_what_is_given_back_lets_the_next_one_in():
    budget = InflightBytes(100)
    entered = asyncio.Event()

    async def waiting() -> None:
        async with budget.hold(60):
            entered.set()

    async with budget.hold(100) as held:
        task = asyncio.create_task(waiting())
        await asyncio.sleep(0.01)
        assert not entered.is_set()
        held.shrink_to(40)
        await asyncio.wait_for(entered.wait(), 1)
    await task
    assert budget.in_use == 0


async def test_more_than_the_whole_budget_is_the_whole_budget():
    budget = InflightBytes(100)
    async with budget.hold(10**12) as held:
        assert held.nbytes == budget.in_use == 100
    assert budget.in_use == 0


async def test_a_waiter_cancelled_gives_its_place_up():
    budget = InflightBytes(100)
    async with budget.hold(100):
        task = asyncio.create_task(budget.hold(50).__aenter__())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    async with budget.hold(100):
        assert budget.in_use == 100
    assert budget.in_use == 0
