"""`trioproxy.client`'s background-task nursery: the block's own error leaves as itself, and none is lost."""

from __future__ import annotations

import pytest
import trio

from trioproxy.client import _unwrapped_nursery


async def fail_in_the_background() -> None:
    raise KeyError("from the background")


async def test_the_blocks_error_leaves_unwrapped_and_the_background_task_is_cancelled(
    autojump_clock: trio.abc.Clock,
) -> None:
    cancelled = trio.Event()

    async def background() -> None:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    with pytest.raises(ValueError, match="from the block"):  # noqa: PT012 - the nursery block is what is tested
        async with _unwrapped_nursery() as nursery:
            nursery.start_soon(background)
            await trio.sleep(1)
            raise ValueError("from the block")
    assert cancelled.is_set()


async def test_a_background_failure_and_the_blocks_error_both_leave(autojump_clock: trio.abc.Clock) -> None:
    with pytest.raises(BaseExceptionGroup) as info:  # noqa: PT012 - the nursery block is what is tested
        async with _unwrapped_nursery() as nursery:
            nursery.start_soon(fail_in_the_background)
            try:
                await trio.sleep_forever()  # cancelled when the background task fails
            finally:
                raise ValueError("from the block")  # the block fails while unwinding
    kinds = {type(e) for e in info.value.exceptions}
    assert kinds == {ValueError, KeyError}


async def test_a_background_failure_alone_leaves_as_the_nurserys_group(autojump_clock: trio.abc.Clock) -> None:
    with pytest.raises(BaseExceptionGroup) as info:  # noqa: PT012 - the nursery block is what is tested
        async with _unwrapped_nursery() as nursery:
            nursery.start_soon(fail_in_the_background)
            await trio.sleep_forever()
    assert [type(e) for e in info.value.exceptions] == [KeyError]
