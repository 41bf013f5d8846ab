"""The visual server's state machine, in-process: one ViT job per image however many
requests wait for it, failures straight to HTTP, and aborts at every stage of a request's
stay (before encoding, during, after forwarding) without leaving anything behind."""

from __future__ import annotations

import time

import pytest

from ipc_fakes import FakeCache, FakeWorker, ListPipe, image_ref, request
from mmserver.ipc import Abort, Failure, Submit
from mmserver.visual.server import VisualServer


class Harness:
    def __init__(self, batch_size: int = 4):
        self.worker = FakeWorker()
        self.cache = FakeCache()
        self.to_router = ListPipe()
        self.to_http = ListPipe()
        self.server = VisualServer([self.worker], self.cache, self.to_router, self.to_http, batch_size)

    def submit(self, req_id: int, *record_ids: int):
        req = request(req_id, images=tuple(image_ref(r) for r in record_ids))
        self.server.handle(Submit(req))
        return req

    def encode(self, done=(), failed=()) -> None:
        """The worker's batch comes back; the loop collects it and dispatches the next."""
        self.worker.finish(done, failed)
        self.server.collect()
        self.server.dispatch()

    def assert_idle(self) -> None:
        s = self.server
        assert not s.pending and not s.waiters and not s.jobs, (s.pending, s.waiters, s.jobs)


@pytest.fixture
def h() -> Harness:
    return Harness()


def test_two_requests_for_one_image_make_one_job(h):
    r1, r2 = h.submit(1, 7), h.submit(2, 7)
    h.server.dispatch()
    assert h.worker.batches == [[7]] and h.worker.prefetched == [7]
    h.encode(done=[7])
    assert h.to_router == [Submit(r1), Submit(r2)] and h.cache.marked == [7]
    assert h.to_http == []
    h.assert_idle()


def test_an_image_named_twice_in_one_request_waits_once(h):
    r1 = h.submit(1, 7, 7)
    h.server.dispatch()
    h.encode(done=[7])
    assert h.to_router == [Submit(r1)]
    h.assert_idle()


def test_an_image_encoded_here_is_not_encoded_again(h):
    h.submit(1, 7)
    h.server.dispatch()
    h.encode(done=[7])
    r2 = h.submit(2, 7)  # its reference was taken just before the embedding was marked present
    assert h.to_router[-1] == Submit(r2) and h.worker.batches == [[7]]


def test_a_failed_image_fails_every_request_waiting_for_it(h):
    h.submit(1, 7)
    h.submit(2, 8, 7)  # image 1 of request 2
    h.server.dispatch()
    assert h.worker.batches == [[7, 8]]
    h.encode(done=[8], failed=[(7, "invalid", "cannot decode the image")])
    assert h.to_http == [Failure(1, "invalid", "image 0: cannot decode the image"),
                         Failure(2, "invalid", "image 1: cannot decode the image")]
    assert h.to_router == [] and h.cache.marked == [8]  # 8 stays cached for later requests
    h.assert_idle()


def test_a_failure_names_the_item_by_its_label(h):
    """A video's record fails as "video j" in its request (its place among the videos)."""
    req = request(1, images=(image_ref(8), image_ref(7)))
    req.images[1].label = "video 0"
    h.server.handle(Submit(req))
    h.server.dispatch()
    h.encode(done=[8], failed=[(7, "invalid", "truncated")])
    assert h.to_http == [Failure(1, "invalid", "video 0: truncated")]
    h.assert_idle()


def test_an_encoder_error_is_a_500_kind_failure(h):
    h.submit(1, 7)
    h.server.dispatch()
    h.encode(failed=[(7, "error", "out of memory")])
    assert h.to_http == [Failure(1, "error", "image 0 could not be encoded: out of memory")]
    h.assert_idle()


def test_failure_withdraws_the_requests_other_queued_images():
    h = Harness(batch_size=1)
    h.submit(1, 7, 8)
    h.server.dispatch()  # 7 goes to the worker, 8 waits in the queue
    h.encode(failed=[(7, "invalid", "bad")])
    assert h.worker.batches == [[7]] and h.worker.forgotten == [8]
    h.assert_idle()


def test_abort_before_encoding_drops_the_request_and_its_job(h):
    h.submit(1, 7)
    h.server.handle(Abort(1))
    assert h.to_router == [] and h.to_http == []  # never reaches the router; HTTP is not waiting
    assert h.worker.forgotten == [7]  # its prefetched tiles are dropped
    h.assert_idle()
    h.server.dispatch()
    assert h.worker.batches == []


def test_abort_before_encoding_keeps_a_job_another_request_waits_for(h):
    h.submit(1, 7)
    r2 = h.submit(2, 7)
    h.server.handle(Abort(1))
    assert h.worker.forgotten == []
    h.server.dispatch()
    h.encode(done=[7])
    assert h.to_router == [Submit(r2)]
    h.assert_idle()


def test_abort_during_encoding_discards_the_result(h):
    h.submit(1, 7)
    h.server.dispatch()
    h.server.handle(Abort(1))
    assert h.to_router == [] and not h.server.pending
    h.encode(done=[7])
    assert h.to_router == [] and h.to_http == []
    assert h.cache.marked == [7]  # the embedding is written all the same: a later request hits it
    h.assert_idle()


def test_a_request_arriving_after_such_an_abort_joins_the_job_in_flight(h):
    h.submit(1, 7)
    h.server.dispatch()
    h.server.handle(Abort(1))
    r2 = h.submit(2, 7)
    h.server.dispatch()
    assert h.worker.batches == [[7]]  # not encoded a second time
    h.encode(done=[7])
    assert h.to_router == [Submit(r2)]
    h.assert_idle()


def test_abort_after_forwarding_follows_the_request_to_the_router(h):
    r1 = h.submit(1, 7)
    h.server.dispatch()
    h.encode(done=[7])
    h.server.handle(Abort(1))
    assert h.to_router == [Submit(r1), Abort(1)]  # same pipe, in this order
    h.assert_idle()


def test_a_request_with_nothing_to_encode_is_forwarded_at_once(h):
    req = request(1, images=(image_ref(7, needs_vit=False),))
    h.server.handle(Submit(req))
    h.server.handle(Abort(1))
    assert h.to_router == [Submit(req), Abort(1)]
    h.assert_idle()


def test_forwarding_records_the_time_spent_here(h):
    r1 = h.submit(1, 7)
    r1.t_sent = sent = time.monotonic() - 1.0  # HTTP sent it a second ago
    h.server.dispatch()
    h.encode(done=[7])
    assert h.server.stats.ttft_visual_n == 1 and 1.0 <= h.server.stats.ttft_visual_s < 10
    assert h.to_router[0].req.t_sent >= sent + 1.0  # restamped for the router's share
    assert h.server.stats.vit_images == 1 and h.server.stats.vit_batch_sizes == {1: 1}
