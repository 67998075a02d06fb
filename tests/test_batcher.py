"""DynamicBatcher rules, with plain-Python prepare/infer stand-ins (no torch)."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from proctor.batching.batcher import BatcherClosed, BatcherError, DynamicBatcher, QueueFull, Replaced
from proctor.metrics import Metrics


class Recorder:
    """infer() stand-in: records each batch and answers item * 10; can be held to simulate a busy model."""

    def __init__(self):
        self.batches = []
        self.gate = threading.Event()
        self.gate.set()

    def prepare(self, item):
        if item == "bad":
            raise ValueError("corrupt frame")
        return item

    def infer(self, items):
        self.gate.wait(5)
        self.batches.append(list(items))
        return [item * 10 for item in items]


@pytest.fixture
def pools():
    decode = ThreadPoolExecutor(2)
    infer = ThreadPoolExecutor(1)
    yield decode, infer
    decode.shutdown(wait=True)
    infer.shutdown(wait=True)


def make(recorder, pools, **kwargs):
    decode, infer = pools
    options = dict(max_batch=8, max_wait_s=0.02, max_queue=100)
    options.update(kwargs)
    batcher = DynamicBatcher(prepare=recorder.prepare, infer=recorder.infer, decode_executor=decode,
                             infer_executor=infer, **options)
    batcher.start()
    return batcher


async def test_one_batch_mixes_frames_of_many_sessions(pools):
    rec = Recorder()
    batcher = make(rec, pools)
    futures = [batcher.submit(f"student-{i}", i) for i in range(6)]
    assert await asyncio.gather(*futures) == [0, 10, 20, 30, 40, 50]
    assert rec.batches == [[0, 1, 2, 3, 4, 5]]
    await batcher.close()


async def test_batch_closes_at_max_batch_without_waiting(pools):
    rec = Recorder()
    batcher = make(rec, pools, max_batch=4, max_wait_s=10.0)
    futures = [batcher.submit(i, i) for i in range(4)]
    await asyncio.wait_for(asyncio.gather(*futures), 2.0)  # would hang for 10 s if it waited
    assert rec.batches == [[0, 1, 2, 3]]
    await batcher.close()


async def test_batch_closes_after_max_wait_with_a_single_frame(pools):
    rec = Recorder()
    batcher = make(rec, pools, max_batch=64, max_wait_s=0.01)
    assert await asyncio.wait_for(batcher.submit("a", 7), 2.0) == 70
    assert rec.batches == [[7]]
    await batcher.close()


async def test_latest_frame_wins_while_queued(pools):
    rec = Recorder()
    batcher = make(rec, pools, max_wait_s=0.05)
    old = batcher.submit("student", 1)
    new = batcher.submit("student", 2)
    with pytest.raises(Replaced):
        await old
    assert await new == 20
    assert rec.batches == [[2]]
    assert batcher.depth == 0
    await batcher.close()


async def test_replacement_keeps_the_sessions_place_in_line(pools):
    rec = Recorder()
    batcher = make(rec, pools, max_batch=2, max_wait_s=0.05)
    batcher.submit("a", 1)
    batcher.submit("b", 2)
    batcher.submit("c", 3)
    a2 = batcher.submit("a", 4)  # replaces a's frame but stays ahead of c
    await asyncio.sleep(0.2)
    assert rec.batches[0] == [4, 2]
    assert await a2 == 40
    await batcher.close()


async def test_full_queue_refuses_without_blocking(pools):
    rec = Recorder()
    rec.gate.clear()  # model busy: nothing leaves the queue
    batcher = make(rec, pools, max_batch=1, max_queue=3, max_wait_s=0.0)
    first = batcher.submit("x", 0)
    await asyncio.sleep(0.05)  # 'x' is taken into a batch; the model holds it
    second = batcher.submit("y", 1)
    await asyncio.sleep(0.05)  # 'y' is decoded and staged
    queued = [batcher.submit(f"q{i}", i) for i in range(3)]
    with pytest.raises(QueueFull):
        batcher.submit("one-too-many", 99)
    # A session already queued may still replace its own frame when the queue is full.
    replaced = batcher.submit("q0", 5)
    with pytest.raises(Replaced):
        await queued[0]
    rec.gate.set()
    assert await asyncio.gather(first, second, replaced, queued[1], queued[2]) == [0, 10, 50, 10, 20]
    await batcher.close()


async def test_cancelled_frame_is_skipped(pools):
    rec = Recorder()
    batcher = make(rec, pools, max_wait_s=0.05)
    gone = batcher.submit("left", 1)
    stays = batcher.submit("stays", 2)
    gone.cancel()  # the student disconnected
    assert await stays == 20
    assert rec.batches == [[2]]
    await batcher.close()


async def test_bad_frame_fails_alone(pools):
    rec = Recorder()
    batcher = make(rec, pools)
    bad = batcher.submit("a", "bad")
    good = batcher.submit("b", 3)
    with pytest.raises(ValueError, match="corrupt frame"):
        await bad
    assert await good == 30
    assert rec.batches == [[3]]
    await batcher.close()


async def test_model_error_fails_the_batch_and_the_batcher_goes_on(pools):
    calls = []

    def infer(items):
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory")
        return [i for i in items]

    decode, infer_pool = pools
    batcher = DynamicBatcher(prepare=lambda x: x, infer=infer, decode_executor=decode,
                             infer_executor=infer_pool, max_batch=4, max_wait_s=0.01, max_queue=10)
    batcher.start()
    with pytest.raises(RuntimeError, match="out of memory"):
        await batcher.submit("a", 1)
    assert await batcher.submit("a", 2) == 2
    await batcher.close()


async def test_result_count_mismatch_fails_every_frame(pools):
    decode, infer_pool = pools
    batcher = DynamicBatcher(prepare=lambda x: x, infer=lambda items: items[:-1], decode_executor=decode,
                             infer_executor=infer_pool, max_batch=4, max_wait_s=0.02, max_queue=10)
    batcher.start()
    futures = [batcher.submit(i, i) for i in range(3)]
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert all(isinstance(r, BatcherError) for r in results)
    await batcher.close()


async def test_batches_grow_while_the_model_is_busy(pools):
    rec = Recorder()
    rec.gate.clear()
    batcher = make(rec, pools, max_batch=16, max_wait_s=0.0)
    first = batcher.submit("s0", 0)
    await asyncio.sleep(0.05)
    later = [batcher.submit(f"s{i}", i) for i in range(1, 11)]
    await asyncio.sleep(0.05)
    rec.gate.set()
    await asyncio.gather(first, *later)
    # Without the busy-model rule, max_wait 0 would run ten batches of one.
    assert len(rec.batches) <= 3
    assert sorted(x for b in rec.batches for x in b) == list(range(11))
    await batcher.close()


async def test_infer_workers_run_batches_at_the_same_time():
    inside, release = threading.Semaphore(0), threading.Event()
    batches = []

    def infer(items):
        batches.append(list(items))
        inside.release()
        release.wait(5)  # each batch stays in the model until both are in
        return [item * 10 for item in items]

    decode, infer_pool = ThreadPoolExecutor(2), ThreadPoolExecutor(2)
    batcher = DynamicBatcher(prepare=lambda x: x, infer=infer, decode_executor=decode, infer_executor=infer_pool,
                             max_batch=2, max_wait_s=0.0, max_queue=10, infer_workers=2)
    batcher.start()
    futures = [batcher.submit(f"s{i}", i) for i in range(4)]
    loop = asyncio.get_running_loop()
    # Two batches entered the model while neither could finish: with one worker the second never would.
    entered = [await loop.run_in_executor(None, inside.acquire, True, 2.0) for _ in range(2)]
    release.set()
    assert entered == [True, True]
    assert await asyncio.gather(*futures) == [0, 10, 20, 30]
    assert sorted(x for b in batches for x in b) == [0, 1, 2, 3] and len(batches) == 2
    await batcher.close()
    decode.shutdown(wait=True)
    infer_pool.shutdown(wait=True)


async def test_items_ready_for_the_model_skip_the_decode_threads(pools):
    _, infer = pools
    unused = ThreadPoolExecutor(1)
    unused.shutdown()  # submitting to it would raise
    batches = []
    batcher = DynamicBatcher(prepare=None, infer=lambda items: batches.append(items) or [i * 10 for i in items],
                             decode_executor=unused, infer_executor=infer, max_batch=4, max_wait_s=0.01,
                             max_queue=10)
    batcher.start()
    assert await asyncio.gather(*(batcher.submit(f"s{i}", i) for i in range(3))) == [0, 10, 20]
    assert batches == [[0, 1, 2]]
    await batcher.close()


async def test_bad_worker_count_is_refused(pools):
    decode, infer = pools
    with pytest.raises(ValueError, match="infer_workers"):
        DynamicBatcher(prepare=lambda x: x, infer=lambda x: x, decode_executor=decode, infer_executor=infer,
                       max_batch=2, max_wait_s=0.0, max_queue=10, infer_workers=0)


async def test_close_fails_waiting_frames_and_refuses_new_ones(pools):
    rec = Recorder()
    rec.gate.clear()
    batcher = make(rec, pools, max_batch=1, max_wait_s=0.0)
    batcher.submit("a", 1)
    await asyncio.sleep(0.05)
    waiting = batcher.submit("b", 2)
    await asyncio.sleep(0.02)
    queued = batcher.submit("c", 3)
    rec.gate.set()
    await batcher.close()
    for fut in (waiting, queued):
        assert fut.done()
    with pytest.raises(BatcherClosed):
        batcher.submit("d", 4)


async def test_every_future_resolved_exactly_once_under_churn(pools):
    rec = Recorder()
    metrics = Metrics()
    batcher = make(rec, pools, max_batch=8, max_wait_s=0.001, max_queue=50, metrics=metrics)
    futures = []
    for round_ in range(30):
        for s in range(20):
            try:
                futures.append(batcher.submit(s, round_ * 100 + s))
            except QueueFull:
                pass
        await asyncio.sleep(0.001)
    results = await asyncio.gather(*futures, return_exceptions=True)
    classified = [r for r in results if not isinstance(r, Exception)]
    replaced = [r for r in results if isinstance(r, Replaced)]
    assert len(classified) + len(replaced) == len(futures)
    assert len(classified) == sum(len(b) for b in rec.batches)
    assert metrics.frames_classified._value.get() == len(classified)
    assert batcher.depth == 0
    await batcher.close()


async def test_decoded_frame_waiting_for_the_model_is_classified_and_the_newer_one_queues(pools):
    rec = Recorder()
    rec.gate.clear()
    batcher = make(rec, pools, max_batch=4, max_wait_s=0.0)
    busy = batcher.submit("other", 0)
    await asyncio.sleep(0.05)  # 'other' is in the model
    staged = batcher.submit("s", 1)
    await asyncio.sleep(0.05)  # decoded and staged, waiting for the model
    fresh = batcher.submit("s", 2)  # it cannot replace a frame that already left the queue
    newest = batcher.submit("s", 3)  # but it replaces the one still queued
    rec.gate.set()
    with pytest.raises(Replaced):
        await fresh
    assert await asyncio.gather(busy, staged, newest) == [0, 10, 30]
    assert rec.batches == [[0], [1], [3]]  # no decode thrown away, no backlog beyond one queued frame
    await batcher.close()


async def test_close_fails_frames_being_decoded_or_in_the_model(pools):
    decode_gate = threading.Event()
    rec = Recorder()
    rec.gate.clear()

    def slow_prepare(item):
        if item == "slow":
            decode_gate.wait(5)
        return item

    decode, infer = pools
    batcher = DynamicBatcher(prepare=slow_prepare, infer=rec.infer, decode_executor=decode, infer_executor=infer,
                             max_batch=1, max_wait_s=0.0, max_queue=10)
    batcher.start()
    in_model = batcher.submit("a", 1)
    await asyncio.sleep(0.05)
    decoding = batcher.submit("b", "slow")
    await asyncio.sleep(0.05)
    close = asyncio.create_task(batcher.close())
    await asyncio.sleep(0.05)
    decode_gate.set()
    rec.gate.set()
    await close
    for future in (in_model, decoding):
        assert future.done()
        with pytest.raises(BatcherClosed):
            future.result()
    assert not batcher._in_flight and batcher.depth == 0


async def test_an_exception_in_place_of_a_result_fails_that_frame_alone(pools):
    decode, infer_pool = pools

    def infer(items):
        return [ValueError(f"frame {i} is corrupt") if i < 0 else i * 2 for i in items]

    batcher = DynamicBatcher(prepare=lambda x: x, infer=infer, decode_executor=decode, infer_executor=infer_pool,
                             max_batch=4, max_wait_s=0.02, max_queue=10)
    batcher.start()
    good, bad = batcher.submit("a", 3), batcher.submit("b", -1)
    assert await good == 6
    with pytest.raises(ValueError, match="frame -1 is corrupt"):
        await bad
    await batcher.close()
