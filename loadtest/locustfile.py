"""llmslo load test: ``locust -f loadtest/ --host http://127.0.0.1:8000``.

Streams OpenAI chat completions (text, image+text, audio+text; thinking on/off),
measures each stream exactly (see docs/glossary.md) and judges the run against
slo.yaml at stop. Locust loads every ``.py`` in this folder whose name does not
start with ``_``: this is the only locustfile; the ``_*.py`` modules are helpers.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import time
import traceback
import uuid
from collections import deque

import gevent
from geventhttpclient.response import HTTPConnectionClosed, HTTPSocketPoolResponse
from geventhttpclient.url import URL
from locust import FastHttpUser, events, task
from locust.exception import CatchResponseError, StopUser

from contract.record import RequestRecord
from loadtest import _run
from loadtest._backlog import Task
from loadtest._run import run_of
from loadtest._shape import SLOShape
from loadtest._reads import SocketReads, StampingClientPool
from loadtest._sse import StreamError, consume
from loadtest._traffic import Planned, plan_request

_run.register(events)
_user_numbers = itertools.count()
PATH = "/v1/chat/completions"
SLO_EVENTS = (("TTFT", "ttft_s"), ("TTFO", "ttfo_s"), ("TPOT", "tpot_s"), ("E2E", "e2e_s"))
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.1, 5.0  # after consecutive failures: 0.1, 0.2, 0.4 ... 5 s
PLAN_WAIT_S = 10.0  # a body planned ahead that is not ready by then is planned again, in the user's greenlet
log = logging.getLogger("llmslo.loadtest")


class RequestTimeout(TimeoutError):
    """The whole request exceeded --request-timeout (a TimeoutError so Locust's client treats it as a failure)."""


@events.test_start.add_listener
def _apply_timeouts(environment, **_kw) -> None:
    """Users are created after test_start, with the socket timeout chosen for this run."""
    ChatUser.network_timeout = environment.parsed_options.stall_timeout
    ChatUser.connection_timeout = environment.parsed_options.stall_timeout


class ChatUser(FastHttpUser):
    """One simulated client: sends a streaming chat request, reads it to the end, repeats.

    After a failed request it backs off (doubling, at most 5 s) so a broken
    server is probed, not flooded; a success resets the backoff. A request read
    to its end is parsed after the user has sent its next one (_account), so a
    failure found in a stream's content delays the request after next.

    Requests go through the HTTP client of Locust's own session pool
    (geventhttpclient's ``HTTPClient``: the user's timeouts, TLS settings and
    proxy), not through the session's ``post``: the session's cookies,
    redirects, URL building and response wrapping, none of which a chat
    stream uses, cost ~90 µs of a request's ~250 µs to send and read
    (docs/benchmarks.md), paid ~700 times a second at 1024 streams. Locust
    still gets every request as its ``request`` event, with the same fields.
    """

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.run = run_of(self.environment)
        self.rng = random.Random(f"{opts.seed}-{self.run.worker_id}-{next(_user_numbers)}")
        self.next_at: float | None = None
        self.next_plan: gevent.Greenlet | None = None
        self.failures_in_a_row = 0
        self.sent = 0  # requests this user sent
        self.last_outcome = 0  # the newest of them whose outcome is known
        self.unparsed: deque[Task] = deque()  # this user's requests waiting in the backlog, oldest first
        agent = self.client.client  # no connection made yet: its connections will keep kernel arrival times
        agent.clientpool = StampingClientPool(**agent.clientpool.client_args)
        base = URL(self.client.base_url)  # --host without its credentials (the session keeps them as auth_header)
        self.http = agent.clientpool.get_client(base)
        self.url = f"{self.client.base_url.rstrip('/')}{PATH}"
        self.path = f"{base.path.rstrip('/')}{PATH}"

    def wait_time(self) -> float:
        return 0.0  # the pause after failures is chat's own (_back_off): it may wait for an outcome first

    def _plan_ahead(self) -> gevent.Greenlet:
        return gevent.spawn(plan_request, self.run.settings.mix, self.rng, gevent.get_hub().threadpool)

    def _planned(self) -> Planned:
        """The body planned while the last request streamed, or planned now.

        A user waiting for a body that never comes sends nothing, and its level silently holds
        fewer streams (a demo once ran 2 of 8 users idle; the cause was not found, suspected: a
        media synthesis in gevent's thread pool never delivered). So the wait is bounded: after
        ``PLAN_WAIT_S`` the stuck plan is logged with where it waited, dropped, and the body is
        built here, media included, without the thread pool.
        """
        plan = self.next_plan or self._plan_ahead()
        try:
            return plan.get(timeout=PLAN_WAIT_S)
        except gevent.Timeout:
            where = "".join(traceback.format_stack(plan.gr_frame)) if plan.gr_frame else "(not started)\n"
            log.error("llmslo loadtest: a request body planned ahead was not ready after %g s: planned again "
                      "without the thread pool. The stuck plan waited at:\n%s", PLAN_WAIT_S, where)
            plan.kill(block=False)
            return plan_request(self.run.settings.mix, self.rng, _InThisGreenlet)

    @task
    def chat(self) -> None:
        self._back_off()
        # the next body (images, audio) is built while this request streams, so a
        # multimodal user is not idle between requests
        planned = self._planned()
        self.next_plan = self._plan_ahead()
        rec = RequestRecord(
            id=uuid.uuid4().hex, cls=planned.cls, thinking=planned.thinking, short=planned.short,
            max_tokens=planned.max_tokens, request_bytes=len(planned.body),
        )
        rec.schedule_lag_s = self._wait_for_slot()
        if self.run.stopping:  # the run is draining (loadtest/_run.py on_test_stopping): send nothing new
            raise StopUser()
        if self.run.reads is not None:  # a burst of users resending runs back to back: read between them
            self.run.reads.read_ready()
        self.run.begin(rec)
        self.sent += 1
        reads: SocketReads | None = None
        try:
            reads = self._send(rec, planned.body)
        except gevent.GreenletExit:  # stopped although the drain gave up waiting for it: still recorded
            rec.error = rec.error or "cancelled by the load generator at stop (outlived the stop drain)"
            raise
        finally:
            if rec.duration_s is None:  # stopped mid-request
                rec.duration_s = time.perf_counter() - rec.start_mono
            if reads is None:  # it failed before a body: recorded now, so the backoff sees it at once
                self._finish(rec, self.sent)
        if reads is not None:  # parsed after this user sent its next request (see _account)
            self.unparsed.append(self.run.backlog.add(self._account, rec, reads, self.sent))

    def _account(self, rec: RequestRecord, reads: SocketReads, number: int) -> None:
        """Parse a read body into its record, report it to Locust, record it: from the run's backlog.

        Parsing and bookkeeping cost ~0.4 ms a request (docs/benchmarks.md). Done by the user
        before its next request, they serialised the turnaround of every stream that ended in
        the same millisecond: in a lockstep burst of 1024 streams the last one sent its next
        request ~0.4 s late, and the process held ~945 of 1024 streams. So the user sends on at
        once and this runs when the process is idle (loadtest/_backlog.py). Every KPI is a
        stamp taken by the reader, so parsing later changes none; the request's ``duration_s``
        ended with its body. A failure found here (a broken stream) reaches the backoff one
        request late.
        """
        try:
            if self.run.reads is not None:  # other streams' chunks first: the parse below waits, theirs would not
                self.run.reads.read_ready()
            consume(rec, reads.blocks, rec.start_mono, reads.late_blocks)
        except StreamError as exc:
            rec.error = str(exc)
        except Exception as exc:  # a parse bug must not lose the record
            rec.error = f"{type(exc).__name__}: {exc}"
        finally:
            try:
                self.run.selfcheck.observe_stamp_delays(reads.delays_s)  # the self-check's samples
                self._report_to_locust(rec, reads.response)
            finally:  # recorded whatever broke above: the drain and this user's backoff wait for it
                self._finish(rec, number)
            if self.run.reads is not None:
                self.run.reads.read_ready()

    def _finish(self, rec: RequestRecord, number: int) -> None:
        """Record the ended request; the newest request's outcome sets the backoff."""
        try:
            if rec.ok:
                self._fire_slo_events(rec)
        finally:
            self.run.end(rec)
            if number >= self.last_outcome:
                self.last_outcome = number
                self.failures_in_a_row = 0 if rec.ok else self.failures_in_a_row + 1

    def _back_off(self) -> None:
        """After failures in a row, pause before the next request (0.1, 0.2, 0.4 ... 5 s): a broken
        server is probed, not flooded.

        A request's outcome may still be waiting in the backlog (_account), so first every request
        but the newest is parsed, here if the backlog has not come to it: a user is never more than
        one request ahead of what it knows, and in a process too busy to be idle, each user parses
        its own requests.
        """
        while len(self.unparsed) > 1:
            self.unparsed.popleft().run()
        if self.failures_in_a_row:
            gevent.sleep(min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (self.failures_in_a_row - 1)))

    def _wait_for_slot(self) -> float | None:
        """Open loop: sleep until this user's next scheduled arrival; return how late we are."""
        rate = self.environment.parsed_options.arrival_rate
        if not rate:
            return None
        per_user = rate / max(1, self.run.load.level or self.environment.runner.user_count)
        law = self.environment.parsed_options.arrival
        gap = self.rng.expovariate(per_user) if law == "poisson" else 1.0 / per_user
        now = time.perf_counter()
        if self.next_at is None:  # random phase so constant-rate users do not fire in lockstep
            self.next_at = now + (gap if law == "poisson" else self.rng.uniform(0, gap))
        else:
            self.next_at += gap
        if self.next_at > now:
            gevent.sleep(self.next_at - now)
        return max(0.0, time.perf_counter() - self.next_at)

    def _send(self, rec: RequestRecord, body: bytes) -> SocketReads | None:
        """Send the request and read its body to the end (stamped, not parsed).

        Returns the body to parse, or None when the request failed before one (HTTP error,
        connection, timeout): ``rec.error`` says how and Locust has been told.
        """
        opts = self.environment.parsed_options
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream",
                   "Accept-Encoding": "identity", "X-Request-Id": rec.id}
        if opts.api_key and self.run.load.send_key:
            headers["Authorization"] = f"Bearer {opts.api_key}"
        elif self.client.auth_header:  # credentials given in --host
            headers["Authorization"] = self.client.auth_header
        rec.start_wall = time.time()
        rec.start_mono = time.perf_counter()
        resp = reads = None
        try:
            with gevent.Timeout(opts.request_timeout, RequestTimeout(f"request exceeded --request-timeout {opts.request_timeout:g} s")):
                resp = self._post(rec, body, headers)
                reads = self._read(resp, rec, opts.stall_timeout)
        except StreamError as exc:
            rec.error = str(exc)
        except Exception as exc:  # --request-timeout, socket timeout (= --stall-timeout), reset, refused
            rec.error = _describe_error(exc, opts.stall_timeout)
        rec.duration_s = time.perf_counter() - rec.start_mono
        if reads is None:
            self._report_to_locust(rec, resp)
        return reads

    def _post(self, rec: RequestRecord, body: bytes, headers: dict) -> HTTPSocketPoolResponse:
        """Send; the response, its headers read.

        Servers may close an idle persistent connection at any time (RFC 9112 9.6); llama.cpp's
        server does so after some streamed replies without ``Connection: close``, and the next
        request sent on it gets no answer. geventhttpclient, rightly, never resends a POST on its
        own. The OpenAI SDK resends such requests (``max_retries`` 2), so the load test resends
        once, on a new connection, and counts it (``connection_retries``); a second such close
        is a failure.
        """
        try:
            return self.http.request("POST", self.path, body=body, headers=headers)
        except HTTPConnectionClosed:
            if rec.connection_retries:
                raise
        rec.connection_retries += 1  # start_mono stays: the lost attempt's time is the user's too
        self._fire_request(rec, (time.perf_counter() - rec.start_mono) * 1000, 0, f"{STALE}; resent once")
        return self.http.request("POST", self.path, body=body, headers=headers)

    def _read(self, resp: HTTPSocketPoolResponse, rec: RequestRecord, stall_timeout: float) -> SocketReads:
        """The body read to its end as stamped blocks, or StreamError for an answer that is not a stream."""
        rec.status = resp.status_code
        if rec.status >= 300:
            try:
                raise StreamError(f"HTTP {rec.status}: {_error_message(resp)}")
            finally:
                resp.release()
        loop = self.run.reads
        reads = SocketReads(resp, loop)
        try:
            reads.read(stall_timeout)
        except BaseException:
            self.run.selfcheck.observe_stamp_delays(reads.delays_s)
            raise
        if loop is not None:  # other streams' chunks before this user's next request: theirs are due, it is not
            loop.read_ready()
        return reads

    def _report_to_locust(self, rec: RequestRecord, response: HTTPSocketPoolResponse | None) -> None:
        """Locust's request event for an ended request (its tables, charts and failures), with our time and outcome."""
        self._fire_request(rec, rec.duration_s * 1000, rec.response_bytes, None if rec.ok else rec.error or "failed", response)

    def _fire_request(self, rec: RequestRecord, ms: float, length: int, error: str | None,
                      response: HTTPSocketPoolResponse | None = None) -> None:
        self.environment.events.request.fire(
            request_type="POST", name=f"chat [{rec.cls}]", response_time=ms, response_length=length,
            exception=None if error is None else CatchResponseError(error), context=self.context(),
            response=response, start_time=rec.start_wall, url=self.url)

    def _fire_slo_events(self, rec: RequestRecord) -> None:
        """Each KPI sample as a Locust request event, so the stock tables and charts show it."""
        fire = self.environment.events.request.fire
        for label, field in SLO_EVENTS:
            value = getattr(rec, field)
            if value is not None:
                fire(request_type="SLO", name=f"{label} [{rec.cls}]", response_time=value * 1000,
                     response_length=rec.output_tokens or 0, exception=None, context={})


STALE = "the server closed a kept-alive connection without answering"


class _InThisGreenlet:
    """A media pool for :func:`plan_request` that runs the synthesis here (blocking this process meanwhile)."""

    @staticmethod
    def apply(func, args):
        return func(*args)


def _error_message(resp: HTTPSocketPoolResponse) -> str:
    """The server's error text: OpenAI-style error.message if present, else the body's start.

    A redirect is not followed (a POST resent elsewhere would time the detour as the model's):
    the message names where it pointed.
    """
    if 300 <= resp.status_code < 400:
        return f"redirected to {resp.get('location', '(no Location)')} (not followed: give --host the address that answers)"
    try:
        text = resp.read().decode("utf-8", "replace")
    except Exception as exc:  # the body itself could not be read
        return f"(body unreadable: {exc})"
    try:
        obj = json.loads(text)
        err = obj.get("error") if isinstance(obj, dict) else None
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(obj, dict) and obj.get("detail"):
            return str(obj["detail"])
    except ValueError:
        pass
    return text.strip()[:200] or "(empty body)"


def _describe_error(exc: BaseException, stall_timeout: float) -> str:
    if isinstance(exc, RequestTimeout):
        return str(exc)
    if isinstance(exc, TimeoutError) or "timed out" in str(exc):
        return f"stalled: no byte for {stall_timeout:g} s (--stall-timeout)"
    if isinstance(exc, ConnectionRefusedError) or getattr(exc, "errno", None) == 111:
        return f"connection refused: {exc}"
    return f"{type(exc).__name__}: {exc}"


__all__ = ["ChatUser", "SLOShape"]
