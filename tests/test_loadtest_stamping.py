"""Stamp first, parse later: the SSE reader's stamps per socket read, and the self-check's stamping delay."""

from __future__ import annotations

import json
import time

import gevent
import gevent.socket
import gevent.ssl
import pytest
from geventhttpclient.response import HTTPSocketResponse

from contract.record import RequestRecord
from loadtest._selfcheck import DELAY_BIN_S, stamp_delay_p99
from loadtest._reads import (
    ReadLoop, SocketReads, StallTimeout, StampedSSLSocket, StampingClientPool, kernel_timestamps_on,
)
from loadtest._sse import StreamError, consume

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def _chunked(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _event(obj: dict | str) -> bytes:
    return b"data: " + (obj.encode() if isinstance(obj, str) else json.dumps(obj).encode()) + b"\n\n"


@pytest.fixture
def loop():
    reads = ReadLoop()
    yield reads
    reads.close()


@pytest.fixture(params=["read loop", "greenlet per stream"])
def any_loop(request):
    """Both read paths: the epoll loop, and the fallback (TLS, no epoll) of a greenlet per stream."""
    if request.param == "greenlet per stream":
        yield None
        return
    reads = ReadLoop()
    yield reads
    reads.close()


def _connected() -> tuple[gevent.socket.socket, gevent.socket.socket]:
    listener = gevent.socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = gevent.socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    return client, server


def test_a_busy_generator_stamps_the_kernels_arrival_time_and_counts_the_delay(loop):
    """Bytes that wait in the kernel while the generator is busy keep their arrival time (kernel timestamps):
    the TTFT is not inflated by the 30 ms the reader was late, and the delay is counted for the self-check."""
    keeper = kernel_timestamps_on()  # as the self-check does for the run
    client, server = _connected()
    server.sendall(HEAD)
    response = HTTPSocketResponse(client)
    t0 = time.perf_counter()
    server.sendall(_chunked(_event({"choices": [{"delta": {"content": "a"}}]})))
    time.sleep(0.03)  # the generator is busy elsewhere: the chunk waits, its stamp is late
    gevent.get_hub().loop.update_now()  # the loop's clock, too, missed the 30 ms
    gevent.spawn_later(0.02, server.sendall, _chunked(_event("[DONE]")) + b"0\r\n\r\n")
    reads = SocketReads(response, loop)
    blocks = reads.read(stall_timeout=5.0)
    assert len(blocks) == 2 and reads.delays_s[0] >= 0.03  # the kernel had it >= 30 ms before the stamp
    rec = RequestRecord(id="r", cls="text", thinking=False, short=False, max_tokens=1)
    consume(rec, blocks, t0)
    assert rec.ok and rec.output_tokens == 1 and rec.ttft_s < 0.01  # sent right after t0, read 30 ms later
    assert rec.e2e_s >= 0.045  # [DONE] came 20 ms after the late read: its own time
    for sock in (client, server, keeper):
        sock.close()


def test_a_first_token_sent_with_the_headers_keeps_its_kernel_arrival_time(loop):
    """A server that holds its headers back until the first token (llmslo's ingress) delivers that token
    in the HTTP client's header read; through StampingClientPool that read keeps the kernel's arrival
    time too, so a client that got to it 30 ms late does not add 30 ms to the TTFT."""
    keeper = kernel_timestamps_on()
    listener = gevent.socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)  # the request
        conn.sendall(HEAD + _chunked(_event({"choices": [{"delta": {"content": "a"}}]})))
        time.sleep(0.03)  # the process is busy: the client's header read comes 30 ms after the bytes
        gevent.sleep(0.02)
        conn.sendall(_chunked(_event("[DONE]")) + b"0\r\n\r\n")
        conn.close()

    server = gevent.spawn(serve)
    client = StampingClientPool().get_client(f"http://127.0.0.1:{listener.getsockname()[1]}/")
    t0 = time.perf_counter()
    response = client.request("POST", "/v1/chat/completions", body=b"{}")
    reads = SocketReads(response, loop)
    blocks = reads.read(stall_timeout=5.0)
    rec = RequestRecord(id="r", cls="text", thinking=False, short=False, max_tokens=1)
    consume(rec, blocks, t0)
    assert time.perf_counter() - t0 >= 0.05 and rec.ok and rec.output_tokens == 1
    assert rec.ttft_s < 0.01  # arrived right after t0, read 30 ms later: the clock would say >= 30 ms
    assert reads.delays_s[0] >= 0.03  # and the header read's lateness reaches the self-check
    server.join(5)
    client.close()
    for sock in (listener, keeper):
        sock.close()


def _two_tokens_while_busy(server, token: bytes, done: bytes) -> None:
    """Two tokens 15 ms apart that wait in the kernel while this process is busy (30 ms); the end 20 ms later."""
    server.sendall(token)
    time.sleep(0.015)  # a real sleep: the reader cannot run
    server.sendall(token)
    time.sleep(0.015)
    gevent.get_hub().loop.update_now()  # the loop's clock, too, missed the 30 ms
    gevent.spawn_later(0.02, server.sendall, done)


def _tls_pair(tls_cert) -> tuple:
    """A TLS connection on loopback: (client, server), gevent's sockets; the client's is a StampedSSLSocket,
    as StampingClientPool makes them."""
    server_tls = gevent.ssl.SSLContext(gevent.ssl.PROTOCOL_TLS_SERVER)  # gevent's: cooperative handshakes
    server_tls.load_cert_chain(*map(str, tls_cert))
    client_tls = gevent.ssl.SSLContext(gevent.ssl.PROTOCOL_TLS_CLIENT)
    client_tls.check_hostname, client_tls.verify_mode = False, gevent.ssl.CERT_NONE
    client_tls.sslsocket_class = StampedSSLSocket
    client_raw, server_raw = _connected()
    accepting = gevent.spawn(server_tls.wrap_socket, server_raw, server_side=True)
    client = client_tls.wrap_socket(client_raw)
    server = accepting.get(timeout=5)
    client.sendall(b"ping")  # one round trip settles the handshake's leftovers (TLS 1.3 session tickets)
    assert server.recv(4) == b"ping"
    server.sendall(b"pong")
    assert client.recv(4) == b"pong"
    return client, server


@pytest.mark.parametrize("reader", ["prompt", "late", "late, headers with the first token"])
def test_over_tls_reads_carry_the_kernels_arrival_time(loop, tls_cert, reader):
    """Over TLS a one-byte peek before each read gives the kernel's arrival time. Two token records
    15 ms apart: read promptly, each keeps its own time; waiting together for a reader 30 ms late, the
    kernel holds them under the newer one's time, which both get (not the clock's, 15 ms later), and
    the record says the first token was read late together with the next. A first token that came
    with the headers, read 30 ms late by the HTTP client's header read, keeps its arrival time too."""
    keeper = kernel_timestamps_on()
    client, server = _tls_pair(tls_cert)
    token = _chunked(_event({"choices": [{"delta": {"content": "a"}}]}))
    done = _chunked(_event("[DONE]")) + b"0\r\n\r\n"
    if reader == "late, headers with the first token":
        t0 = time.perf_counter()
        server.sendall(HEAD + token)
        time.sleep(0.03)  # the generator is busy: the header read comes 30 ms after the bytes
        gevent.get_hub().loop.update_now()
        gevent.spawn_later(0.02, server.sendall, done)
        response = HTTPSocketResponse(client)
    else:
        server.sendall(HEAD)
        response = HTTPSocketResponse(client)
        t0 = time.perf_counter()
        if reader == "late":
            _two_tokens_while_busy(server, token, done)  # one TLS record each
        else:
            server.sendall(token)
            gevent.spawn_later(0.015, server.sendall, token)
            gevent.spawn_later(0.03, server.sendall, done)
    reads = SocketReads(response, loop)
    blocks = reads.read(stall_timeout=5.0)
    rec = RequestRecord(id="r", cls="text", thinking=False, short=False, max_tokens=2)
    consume(rec, blocks, t0, reads.late_blocks)
    assert rec.ok and reads.delays_s
    if reader == "prompt":
        assert rec.ttft_s < 0.005 and 0.012 < rec.itl_s[0] < 0.025 and not rec.first_token_late_shared
    elif reader == "late":
        assert 0.012 < rec.ttft_s < 0.025  # the second record's arrival; the clock would say >= 30 ms
        assert rec.itl_s == [0.0] and rec.first_token_late_shared and rec.late_shared_reads == 1
        assert max(reads.delays_s) >= 0.012  # the lateness reaches the self-check
    else:
        assert rec.ttft_s < 0.005 and reads.delays_s[0] >= 0.025  # the clock would say >= 30 ms
    for sock in (client, server, keeper):
        sock.close()


def test_over_tls_the_body_is_read_to_its_end_so_the_connection_can_be_reused(loop, tls_cert):
    """The chunked body's end comes in a TLS record of its own, here 2 ms after [DONE]: it is read, so the
    response is complete and its connection goes back to the pool (left unread, every request paid a new
    TCP and TLS handshake inside its TTFT)."""
    client, server = _tls_pair(tls_cert)
    server.sendall(HEAD)
    response = HTTPSocketResponse(client)
    server.sendall(_chunked(_event({"choices": [{"delta": {"content": "a"}}]})))
    server.sendall(_chunked(_event("[DONE]")))
    gevent.spawn_later(0.002, server.sendall, b"0\r\n\r\n")
    sock = response._sock
    blocks = SocketReads(response, loop).read(stall_timeout=5.0)
    assert len(blocks) == 2 and response.message_complete and not response.should_close()
    assert not sock.closed  # released to be reused (HTTPSocketResponse has no pool: it keeps it open)
    client.close()
    server.close()


def test_the_loop_reads_a_burst_of_streams_each_to_its_own_end(any_loop):
    """64 streams whose chunks are written in the same millisecond, read by the one loop: every stream gets
    exactly its own bytes, in order, and its greenlet wakes only when its body has ended."""
    pairs = [_connected() for _ in range(64)]
    for _client, server in pairs:
        server.sendall(HEAD)
    responses = [HTTPSocketResponse(client) for client, _server in pairs]
    readers = [gevent.spawn(SocketReads(r, any_loop).read, 5.0) for r in responses]
    gevent.sleep(0.01)
    for step in range(5):
        for i, (_client, server) in enumerate(pairs):  # one burst: every stream's chunk back to back
            server.sendall(_chunked(_event({"choices": [{"delta": {"content": f"{i}:{step}"}}]})))
        gevent.sleep(0.005)
    for _client, server in pairs:
        server.sendall(_chunked(_event("[DONE]")) + b"0\r\n\r\n")
    gevent.joinall(readers, timeout=5, raise_error=True)
    for i, reader in enumerate(readers):
        body = b"".join(block for _t, block in reader.value)
        assert body == b"".join(_event({"choices": [{"delta": {"content": f"{i}:{s}"}}]}) for s in range(5)) + _event("[DONE]")
        stamps = [t for t, _block in reader.value]
        assert stamps == sorted(stamps)
    for client, server in pairs:
        client.close()
        server.close()


def test_a_silent_server_stalls_the_read_and_a_closed_one_ends_it(any_loop):
    """No byte for the stall timeout raises StallTimeout (reported as a stall); a server that closes mid-body
    ends the read with what came, and the parser then names the missing end."""
    client, server = _connected()
    server.sendall(HEAD + _chunked(_event({"choices": [{"delta": {"content": "a"}}]})))
    started = time.perf_counter()
    with pytest.raises(StallTimeout):
        SocketReads(HTTPSocketResponse(client), any_loop).read(stall_timeout=0.2)
    assert 0.2 <= time.perf_counter() - started < 2.0
    client2, server2 = _connected()
    server2.sendall(HEAD + _chunked(_event({"choices": [{"delta": {"content": "a"}}]})))
    gevent.spawn_later(0.05, server2.close)
    blocks = SocketReads(HTTPSocketResponse(client2), any_loop).read(stall_timeout=5.0)
    rec = RequestRecord(id="r", cls="text", thinking=False, short=False, max_tokens=1)
    with pytest.raises(StreamError, match="without \\[DONE\\]"):
        consume(rec, blocks, 0.0)
    for sock in (client, server, client2):
        sock.close()


def test_each_line_gets_the_stamp_of_the_read_that_completed_it():
    rec = RequestRecord(id="r", cls="text", thinking=False, short=False, max_tokens=3)
    token = lambda text: _event({"choices": [{"delta": {"content": text}}]})  # noqa: E731
    blocks = [
        (1.0, token("a") + token("b")[:9]),  # the second event is split across reads
        (2.0, token("b")[9:] + token("says [DONE]")),  # "[DONE]" in a token does not end the stream
        (3.0, _event("[DONE]")),
        (4.0, b"data: {broken\n"),  # after [DONE]: never read
    ]
    consume(rec, iter(blocks), t0=0.5)
    assert rec.ok and rec.ttft_s == 0.5 and rec.itl_s == [1.0, 0.0] and rec.e2e_s == 2.5
    assert rec.tokens_source == "deltas" and rec.output_tokens == 3


def test_stamping_delay_p99_is_an_upper_bound_over_batches():
    # 98 reads in bin 0, one in bin 3, one in bin 50, the last two shipped in separate batches
    bins = [[0, 97], [3, 1], [0, 1], [50, 1]]
    assert stamp_delay_p99(bins) == 4 * DELAY_BIN_S  # the 99th of 100 reads is in bin 3: < 0.4 ms
    assert stamp_delay_p99([]) is None


def test_a_stream_without_done_ends_well_only_after_a_finish_reason():
    """transformers serve sends no [DONE]: its last chunk carries finish_reason (and usage)."""
    token = _event({"choices": [{"delta": {"content": "a"}, "index": 0}]})
    finish = _event({"choices": [{"delta": {}, "index": 0, "finish_reason": "length"}],
                     "usage": {"completion_tokens": 2, "prompt_tokens": 4}})
    rec = RequestRecord(id="r", cls="text", thinking=False, short=False, max_tokens=2)
    consume(rec, iter([(1.0, token), (1.5, token), (2.0, finish)]), t0=0.0)
    assert rec.ok and rec.e2e_s == 2.0 and rec.output_tokens == 2 and rec.tokens_source == "usage"
    cut = RequestRecord(id="c", cls="text", thinking=False, short=False, max_tokens=2)
    with pytest.raises(StreamError, match="without \\[DONE\\] and without a finish_reason"):
        consume(cut, iter([(1.0, token), (1.5, token)]), t0=0.0)


def test_tokens_read_late_together_are_counted_and_tokens_written_together_are_not(loop):
    """Two tokens 15 ms apart that wait in the kernel while the generator is busy come in one late read:
    the first carries the second's arrival, and the record says so. Two tokens the server wrote at once,
    read promptly, share a read too (0 s gap) but are stamped right: not counted."""
    keeper = kernel_timestamps_on()
    token = _chunked(_event({"choices": [{"delta": {"content": "a"}}]}))
    done = _chunked(_event("[DONE]")) + b"0\r\n\r\n"
    records = []
    for late in (True, False):
        client, server = _connected()
        server.sendall(HEAD)
        response = HTTPSocketResponse(client)
        t0 = time.perf_counter()
        if late:
            _two_tokens_while_busy(server, token, done)
        else:
            gevent.spawn_later(0.01, server.sendall, token + token)  # written at once, read promptly
            gevent.spawn_later(0.03, server.sendall, done)
        reads = SocketReads(response, loop)
        blocks = reads.read(stall_timeout=5.0)
        rec = RequestRecord(id="r", cls="text", thinking=False, short=False, max_tokens=2)
        consume(rec, blocks, t0, reads.late_blocks)
        records.append(rec)
        client.close()
        server.close()
    keeper.close()
    late_rec, prompt_rec = records
    assert late_rec.itl_s == [0.0] and late_rec.first_token_late_shared and late_rec.late_shared_reads == 1
    assert prompt_rec.itl_s == [0.0] and not prompt_rec.first_token_late_shared and prompt_rec.late_shared_reads == 0


def test_a_run_is_invalid_when_tokens_or_first_tokens_shared_late_reads():
    """Kernel arrival times make a late read harmless unless two tokens came in one late read; first
    tokens are counted apart (one per request: 1 request in 10 moves TTFT's p99)."""
    from loadtest._selfcheck import coalesced_gaps, validity

    def rec(gaps: list[float], late: int = 0, first_late: bool = False) -> RequestRecord:
        r = RequestRecord(id="r", cls="text", thinking=False, short=False, max_tokens=len(gaps) + 1)
        r.worker, r.itl_s, r.late_shared_reads, r.first_token_late_shared = "w", gaps, late, first_late
        return r

    samples = {"cpu_percent": [10.0], "loop_lag_s": [0.001], "cpu_seconds": [1.0], "stamp_delay_bins": [[0, 100]]}
    server_wrote_together = coalesced_gaps([rec([0.018] * 90 + [0.0] * 10)])  # 0 s gaps from prompt reads
    read_late_together = coalesced_gaps([rec([0.018] * 90 + [0.0] * 10, late=10)])
    first_tokens = coalesced_gaps([rec([0.0] + [0.018] * 99, late=1, first_late=True),
                                   *(rec([0.018] * 100) for _ in range(9))])

    def valid(gaps) -> bool:
        return validity({"w": samples}, [], 90, 0.02, 0.1, gaps, 0.01)["valid"]

    assert server_wrote_together["w"]["coalesced_share"] == 0.1 and server_wrote_together["w"]["late_shared_share"] == 0
    assert first_tokens["w"]["late_shared_share"] == 0.001 and first_tokens["w"]["late_shared_first_share"] == 0.1
    assert valid(server_wrote_together)
    assert not valid(read_late_together)
    assert not valid(first_tokens)  # 0.1 % of tokens, but 10 % of first tokens
    reasons = validity({"w": samples}, [], 90, 0.02, 0.1, read_late_together, 0.01)["reasons"]
    assert "not its own load: CPU p90 10%" in reasons[0]  # a process with time to spare was held up
    busy = validity({"w": {**samples, "cpu_percent": [80.0]}}, [], 90, 0.02, 0.1, read_late_together, 0.01)
    assert "not its own load" not in busy["reasons"][0]
    saturated = validity({w: {**samples, "cpu_percent": [95.0]} for w in ("w1", "w2")}, [], 90, 0.02, 0.1)
    assert [r.split(":")[0] for r in saturated["reasons"]] == ["w1", "w2"]
    assert all("spread the users over at least 4 processes" in r for r in saturated["reasons"])  # 2 x 95 % / 60 %


def test_a_block_stamped_later_than_the_next_one_is_capped_at_it():
    """The bytes that came with the headers carry the reader's clock, the next read the kernel's earlier
    arrival time: the first block cannot have arrived after the second, so its stamp is capped (no
    negative gap, no e2e shorter than the TTFT)."""
    token = _event({"choices": [{"delta": {"content": "a"}}]})
    rec = RequestRecord(id="r", cls="text", thinking=False, short=False, max_tokens=1)
    consume(rec, iter([(2.0, token), (1.5, _event("[DONE]"))]), t0=1.0)
    assert rec.ok and rec.ttft_s == 0.5 and rec.e2e_s == 0.5


def test_the_self_check_bins_every_stamping_delay_it_was_given():
    from loadtest._selfcheck import DELAY_BINS, SelfCheck

    check = SelfCheck()
    check.observe_stamp_delays([0.0, 0.00005, 0.00025])
    check.observe_stamp_delays([2.0])  # beyond the last bin: kept in it
    assert sorted(check.snapshot()["stamp_delay_bins"]) == [[0, 2], [2, 1], [DELAY_BINS, 1]]
    assert sorted(check.drain()["stamp_delay_bins"]) == [[0, 2], [2, 1], [DELAY_BINS, 1]]
    assert check.snapshot()["stamp_delay_bins"] == []
