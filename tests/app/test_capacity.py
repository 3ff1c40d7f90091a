"""The heavy-request pool: bounded running and waiting, 503 with Retry-After past that."""

from __future__ import annotations

import asyncio

import pytest

from app.capacity import RETRY_AFTER_S, Busy, WorkPool


def test_pool_runs_workers_queues_the_next_and_turns_away_the_rest() -> None:
    async def scenario() -> tuple[list[str], list[Busy], int]:
        pool = WorkPool(workers=2, queue=1, wait_s=5.0)
        release = asyncio.Event()
        log: list[str] = []
        refused: list[Busy] = []

        async def request(name: str) -> None:
            try:
                async with pool.slot():
                    log.append(f"start {name}")
                    await release.wait()
                    log.append(f"end {name}")
            except Busy as exc:
                refused.append(exc)

        tasks = [asyncio.create_task(request(n)) for n in "abcde"]
        await asyncio.sleep(0.05)
        peak = pool.admitted
        started = list(log)
        release.set()
        await asyncio.gather(*tasks)
        return started + log[len(started):], refused, peak

    log, refused, peak = asyncio.run(scenario())
    assert peak == 3  # two running, one waiting
    assert log[:2] == ["start a", "start b"]
    assert "start c" in log and "start d" not in log and "start e" not in log
    assert len(refused) == 2
    for exc in refused:
        assert exc.status_code == 503 and exc.headers == {"Retry-After": str(RETRY_AFTER_S)}
        assert "MWT_HEAVY_QUEUE" in exc.detail


def test_a_queued_request_gives_up_after_the_wait_and_frees_its_place() -> None:
    async def scenario() -> tuple[str, int]:
        pool = WorkPool(workers=1, queue=1, wait_s=0.1)
        hold = asyncio.Event()

        async def long() -> None:
            async with pool.slot():
                await hold.wait()

        first = asyncio.create_task(long())
        await asyncio.sleep(0.01)
        with pytest.raises(Busy) as waited:
            async with pool.slot():
                pass
        admitted = pool.admitted  # only the running one is left
        hold.set()
        await first
        async with pool.slot():  # free again
            pass
        return str(waited.value.detail), admitted

    detail, admitted = asyncio.run(scenario())
    assert "MWT_HEAVY_WAIT_S" in detail and admitted == 1


def test_an_error_in_the_work_releases_the_slot() -> None:
    async def scenario() -> int:
        pool = WorkPool(workers=1, queue=0, wait_s=1.0)
        with pytest.raises(RuntimeError):
            async with pool.slot():
                raise RuntimeError("the work failed")
        async with pool.slot():
            return pool.admitted

    assert asyncio.run(scenario()) == 1
