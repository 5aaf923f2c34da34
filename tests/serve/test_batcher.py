"""The dynamic batcher on its own: batches form, results find their requests, limits hold."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from nlprnn.serve.batcher import Batcher, BatchRecord, DeadlineExceeded, QueueFull, ShuttingDown


class Model:
    """Answers each text with (text, batch number); can be held to keep a batch running."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.batches: list[list[str]] = []
        self.release = threading.Event()
        self.release.set()
        self.fail_on = fail_on

    def __call__(self, texts: list[str]) -> list[tuple[str, int]]:
        self.release.wait(5)
        if self.fail_on in texts:
            raise RuntimeError("model failed")
        self.batches.append(list(texts))
        return [(text, len(self.batches)) for text in texts]


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 20))


def test_concurrent_requests_share_batches_and_get_their_own_results_in_order():
    model = Model()
    records: list[BatchRecord] = []

    async def main():
        batcher = Batcher(model, max_batch_size=8, max_wait_s=0.05, max_queue=100, on_batch=records.append)
        batcher.start()
        requests = [[f"r{r}t{t}" for t in range(r % 3 + 1)] for r in range(12)]
        answers = await asyncio.gather(*(batcher.classify(texts, timeout_s=5) for texts in requests))
        await batcher.close()
        return requests, answers

    requests, answers = run(main())
    for texts, answer in zip(requests, answers):
        assert [text for text, _ in answer] == texts
    sizes = [len(batch) for batch in model.batches]
    assert sum(sizes) == 24 and max(sizes) <= 8
    assert len(model.batches) <= 4  # 24 texts that all arrived at once fill batches of up to 8
    assert [record.texts for record in records] == sizes


def test_a_request_larger_than_a_batch_is_split_and_put_back_together():
    model = Model()

    async def main():
        batcher = Batcher(model, max_batch_size=4, max_wait_s=0, max_queue=100)
        batcher.start()
        answer = await batcher.classify([str(i) for i in range(10)], timeout_s=5)
        await batcher.close()
        return answer

    assert [text for text, _ in run(main())] == [str(i) for i in range(10)]
    assert [len(batch) for batch in model.batches] == [4, 4, 2]


def test_a_lone_request_waits_at_most_max_wait():
    model = Model()

    async def main():
        batcher = Batcher(model, max_batch_size=64, max_wait_s=0.2, max_queue=100)
        batcher.start()
        started = time.monotonic()
        await batcher.classify(["alone"], timeout_s=5)
        waited = time.monotonic() - started
        await batcher.close()
        return waited

    assert 0.15 < run(main()) < 2


@pytest.mark.parametrize(
    ("max_batch_size", "requests"),
    [(1, [["alone"]]), (4, [["a", "b", "c", "d"]]), (4, [["a"], ["b"], ["c"], ["d"]])],
    ids=["batching-off", "one-request-fills-it", "four-requests-fill-it"],
)
def test_a_full_batch_leaves_at_once_without_waiting_for_max_wait(max_batch_size, requests):
    model = Model()

    async def main():
        batcher = Batcher(model, max_batch_size=max_batch_size, max_wait_s=2, max_queue=100)
        batcher.start()
        started = time.monotonic()
        await asyncio.gather(*(batcher.classify(texts, timeout_s=5) for texts in requests))
        waited = time.monotonic() - started
        await batcher.close()
        return waited

    assert run(main()) < 1  # well before the 2 s a batch with room left waits
    assert model.batches == [[text for texts in requests for text in texts]]


def test_a_full_queue_refuses_at_once_and_takes_requests_again_once_it_drains():
    model = Model()
    model.release.clear()  # the first batch runs until released: texts behind it wait in the queue

    async def main():
        batcher = Batcher(model, max_batch_size=2, max_wait_s=0, max_queue=3)
        batcher.start()
        running = asyncio.ensure_future(batcher.classify(["a", "b"], timeout_s=5))
        await asyncio.sleep(0.05)  # a and b are in the model now; the queue is empty
        queued = asyncio.ensure_future(batcher.classify(["c", "d", "e"], timeout_s=5))
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull):
            await batcher.classify(["f"], timeout_s=5)
        assert batcher.queued_texts == 3
        model.release.set()
        await asyncio.gather(running, queued)
        assert batcher.queued_texts == 0
        again = await batcher.classify(["f"], timeout_s=5)
        await batcher.close()
        return again

    assert run(main()) == [("f", 4)]


def test_a_request_past_its_deadline_leaves_the_queue_unanswered():
    model = Model()
    model.release.clear()

    async def main():
        batcher = Batcher(model, max_batch_size=1, max_wait_s=0, max_queue=10)
        batcher.start()
        first = asyncio.ensure_future(batcher.classify(["slow"], timeout_s=5))
        await asyncio.sleep(0.05)
        with pytest.raises(DeadlineExceeded):
            await batcher.classify(["late", "later"], timeout_s=0.1)
        assert batcher.queued_texts == 0  # its texts left the queue at once
        model.release.set()
        await first
        await batcher.close()

    run(main())
    assert model.batches == [["slow"]]  # the late texts never reached the model


def test_a_failing_model_call_fails_its_requests_only():
    model = Model(fail_on="boom")

    async def main():
        batcher = Batcher(model, max_batch_size=1, max_wait_s=0, max_queue=10)
        batcher.start()
        with pytest.raises(RuntimeError, match="model failed"):
            await batcher.classify(["boom"], timeout_s=5)
        answer = await batcher.classify(["fine"], timeout_s=5)
        await batcher.close()
        return answer

    assert run(main()) == [("fine", 1)]


def test_close_answers_what_is_queued_then_refuses():
    model = Model()

    async def main():
        batcher = Batcher(model, max_batch_size=64, max_wait_s=10, max_queue=100)
        batcher.start()
        waiting = asyncio.ensure_future(batcher.classify(["queued"], timeout_s=20))
        await asyncio.sleep(0.05)  # it would wait 10 s for company; closing sends it at once
        started = time.monotonic()
        await batcher.close()
        assert time.monotonic() - started < 5
        with pytest.raises(ShuttingDown):
            await batcher.classify(["after"], timeout_s=5)
        return await waiting

    assert run(main()) == [("queued", 1)]


def test_a_request_that_gives_up_while_its_batch_gathers_is_left_out_of_it():
    model = Model()

    async def main():
        batcher = Batcher(model, max_batch_size=64, max_wait_s=0.5, max_queue=10)
        batcher.start()
        with pytest.raises(DeadlineExceeded):
            await batcher.classify(["impatient"], timeout_s=0.1)
        assert batcher.queued_texts == 0
        patient = await batcher.classify(["patient"], timeout_s=5)
        await batcher.close()
        return patient

    assert run(main()) == [("patient", 1)]
    assert model.batches == [["patient"]]


def test_run_alone_takes_places_in_the_queue_and_never_runs_beside_a_batch():
    model = Model()
    running = threading.Lock()  # held by whatever runs on the model's thread; a second holder would fail
    overlaps: list[str] = []

    def guarded(fn):
        def call(*args):
            if not running.acquire(blocking=False):
                overlaps.append(fn.__name__)
            try:
                return fn(*args)
            finally:
                running.release()
        return call

    def explain(texts: list[str]) -> list[str]:
        time.sleep(0.05)
        return [text.upper() for text in texts]

    async def main():
        batcher = Batcher(guarded(model), max_batch_size=4, max_wait_s=0, max_queue=6)
        batcher.start()
        model.release.clear()  # the first batch holds the model's thread
        first = asyncio.ensure_future(batcher.classify(["a"], timeout_s=5))
        await asyncio.sleep(0.05)
        alone = asyncio.ensure_future(batcher.run_alone(guarded(explain), ["b"], cost=5, timeout_s=5))
        await asyncio.sleep(0)
        assert batcher.queued_texts == 5
        with pytest.raises(QueueFull):  # 5 places taken by the explanation, 2 more asked for
            await batcher.classify(["c", "d"], timeout_s=5)
        with pytest.raises(QueueFull):
            await batcher.run_alone(explain, ["e"], cost=2, timeout_s=5)
        later = asyncio.ensure_future(batcher.classify(["f"], timeout_s=5))
        await asyncio.sleep(0.05)
        model.release.set()
        answers = await asyncio.gather(first, alone, later)
        await asyncio.sleep(0)  # the places come back on the loop, after the job's done-callback
        queued_after = batcher.queued_texts
        await batcher.close()
        with pytest.raises(ShuttingDown):
            await batcher.run_alone(explain, ["g"], cost=1, timeout_s=5)
        return answers, queued_after

    (first, alone, later), queued_after = run(main())
    assert first == [("a", 1)] and alone == ["B"] and later == [("f", 2)]
    assert overlaps == [] and queued_after == 0


def test_run_alone_past_its_deadline_gives_its_places_back_once_it_has_finished():
    model = Model()

    async def main():
        batcher = Batcher(model, max_batch_size=4, max_wait_s=0, max_queue=4)
        batcher.start()
        with pytest.raises(DeadlineExceeded):
            await batcher.run_alone(time.sleep, 0.3, cost=4, timeout_s=0.05)
        held = batcher.queued_texts  # still running: its places stay taken
        await asyncio.sleep(0.5)
        freed = batcher.queued_texts
        await batcher.close()
        return held, freed

    assert run(main()) == (4, 0)
