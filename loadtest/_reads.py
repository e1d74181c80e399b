"""A response body as stamped blocks, read by one loop for every stream of the process.

Under load, what a read costs decides how many streams one process can hold
and how late the last stream of a burst is read. Measured on the 2-vCPU VM
(docs/benchmarks.md): waking for each chunk costs ~30 µs of gevent's loop;
reading many ready sockets per wake-up costs ~9 µs a chunk. So one greenlet,
:class:`ReadLoop`, holds every stream socket of the process in one epoll set:
once any of them is readable it sleeps one tick (``READ_TICK_S``, 1 ms) to
let the burst gather, then reads every readable socket in one pass: a
non-blocking ``recvmsg``, the clock, the HTTP chunk decoder (C), two appends.
The user's greenlet sleeps until its body has ended and wakes once per
request, not once per chunk.

The tick costs no accuracy where the kernel stamps arrivals: each read asks
the kernel when its bytes reached the socket (``SO_TIMESTAMPNS``, the newest
packet the read took), and that arrival time is the stamp: the clock reading
(``time.perf_counter()``, CLOCK_MONOTONIC on Linux) moved back by the delay
between arrival and read. The delays are kept for the self-check
(loadtest/_selfcheck.py): a reader late by more than the gap between two
chunks of a stream takes both in one read, and the older one then carries the
newer one's time (so with the tick, chunks less than ~1 ms apart share a
stamp). Where there is no epoll or no kernel stamp (TLS, non-Linux), each
stream is read by its own greenlet and stamped by the clock.
"""

from __future__ import annotations

import re
import select
import socket
import ssl
import struct
import sys
import time
from typing import Callable

import gevent
import gevent.monkey
import gevent.socket
import gevent.ssl
from gevent.event import Event
from geventhttpclient.client import HTTPClientPool
from geventhttpclient.connectionpool import ConnectionPool, SSLConnectionPool

Clock = Callable[[], float]
Block = tuple[float, bytes]  # (stamp, bytes one read delivered)
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux's value; Python does not export it
_TIMESPEC = struct.Struct("@qq")
_ANCILLARY = socket.CMSG_SPACE(_TIMESPEC.size)
READ_TICK_S = 0.001  # how long the read loop lets a burst gather (bounds the error where the kernel gives no stamp)
FINISH_WAIT_S = 0.02  # how long a greenlet-read stream waits for the body's end after [DONE] (then the connection closes)
LATE_READ_S = 0.005  # a read pass is late when one of its reads came this long after its bytes (--max-stamp-delay-ms)
_unpack_timespec, _wall_ns, _REALTIME = _TIMESPEC.unpack_from, time.clock_gettime_ns, time.CLOCK_REALTIME
_LINUX = sys.platform.startswith("linux")  # SO_TIMESTAMPNS is Linux's
_DONE_LINE = re.compile(rb"^[ \t\r]*data:[ \t]*\[DONE\][ \t\r]*$", re.MULTILINE)


class StallTimeout(TimeoutError):
    """No byte of the body arrived for the stall timeout."""


def kernel_timestamps_on() -> socket.socket:
    """A socket that asks for receive timestamps; keep it open for the run.

    Linux stamps incoming packets only while some socket asks for it, so
    without this the bytes that reach a fresh connection before its own flag
    is set (its first request's) would carry no kernel time.
    """
    keeper = socket.socket()
    keeper.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    return keeper


class ReadLoop:
    """Reads every registered stream's socket, one tick after the first of a burst became readable.

    One per load-test process (it belongs to the run: loadtest/_run.py). Its greenlet
    sleeps in gevent while no socket is readable, so an idle run costs nothing.

    A pass over the ready sockets is **late** when any of its reads came more than ``late_s``
    after its bytes arrived: the process was held up (a stall, a collection, a burst too big
    for it), and a stream whose older chunk waited through it may have had its next chunk
    arrive meanwhile. Two token events in one read of a late pass are then the reader's
    doing: the older carries the newer one's arrival. Every block a late pass read is marked
    (``SocketReads.late_blocks``) and the self-check counts the tokens that shared such a read
    (loadtest/_selfcheck.py). Two events in one read of a prompt pass are the server's: it
    wrote them together, and their stamps are right.
    """

    def __init__(self, tick_s: float = READ_TICK_S, late_s: float = LATE_READ_S) -> None:
        self.tick_s = tick_s
        self.late_s = late_s
        self._epoll = _original_epoll()()
        self._streams: dict[int, _Stream] = {}
        self._greenlet = gevent.spawn(self._run)

    def add(self, stream: _Stream) -> None:
        self._streams[stream.fd] = stream
        self._epoll.register(stream.fd, select.EPOLLIN)

    def remove(self, stream: _Stream) -> None:
        fd = stream.fd  # as registered: a closed socket's fileno() is -1
        if self._streams.get(fd) is stream:
            del self._streams[fd]
            try:
                self._epoll.unregister(fd)
            except OSError:  # closed already: the kernel dropped it from the set
                pass

    def close(self) -> None:
        self._greenlet.kill()
        self._epoll.close()

    def read_ready(self) -> None:
        """Read every stream socket that is readable now; never switches greenlets.

        Besides the loop's own ticks, users call this between the steps of their per-request
        work. gevent runs woken greenlets in turn, up to 50 before it looks at sockets and
        timers again, so when hundreds of requests end in the same millisecond the loop would
        wait behind all their parsing and bookkeeping (~0.5 ms each); with this, a read waits
        behind one user's step at most.
        """
        streams, taken, worst = self._streams, [], 0.0
        for fd, _events in self._epoll.poll(0):
            stream = streams.get(fd)
            if stream is not None:
                delay = stream.on_readable()
                if delay is not None:
                    taken.append(stream.reads)
                    worst = delay if delay > worst else worst
        if worst > self.late_s:
            for reads in taken:
                reads.late_blocks.add(len(reads.blocks) - 1)

    def _run(self) -> None:
        hub = gevent.get_hub()
        readable = hub.loop.io(self._epoll.fileno(), 1)
        while True:
            hub.wait(readable)  # some stream socket is readable
            gevent.sleep(self.tick_s)  # the rest of the burst arrives meanwhile; the kernel stamps each
            self.read_ready()


def _original_epoll():
    """select.epoll as the OS gives it (gevent's monkey patching hides it; None without epoll)."""
    try:
        return gevent.monkey.get_original("select", "epoll")
    except AttributeError:
        return None


def read_loop() -> ReadLoop | None:
    """A ReadLoop where the platform has epoll, else None (streams are then read by their own greenlets)."""
    return ReadLoop() if _original_epoll() is not None else None


class SocketReads:
    """Reads one response's body to its end and returns it as stamped blocks.

    ``response`` is geventhttpclient's ``HTTPSocketResponse`` (what Locust's
    FastResponse wraps): its socket, its HTTP parser (``feed``, which also
    undoes chunked encoding into ``_body_buffer``) and ``message_complete``.
    Reading stops at the end of the body, when the server closes, or at a
    ``[DONE]`` line. ``delays_s`` collects each read's delay from the kernel's
    receive time to the read (both on CLOCK_REALTIME), by which its stamp was
    moved back; empty where the kernel gives none (TLS, non-Linux: stamps are
    then the read's own time). ``late_blocks``: the indexes of the blocks read
    late (in a late pass of the loop, or a header read that came more than
    ``late_s`` after its bytes).
    """

    def __init__(self, response, loop: ReadLoop | None, clock: Clock = time.perf_counter) -> None:
        self.response = response
        self.loop = loop
        self.clock = clock
        self.late_s = loop.late_s if loop is not None else LATE_READ_S
        self.delays_s: list[float] = []
        self.blocks: list[Block] = []
        self.late_blocks: set[int] = set()

    def read(self, stall_timeout: float) -> list[Block]:
        """Every block of the body; raises what broke the read (StallTimeout after ``stall_timeout`` s of silence)."""
        resp = self.response
        self._take_buffered(self._header_read_stamp())  # arrived with the headers
        sock = resp._sock
        try:
            if sock is None or resp.message_complete or self._done():
                return self.blocks
            if self.loop is None or isinstance(sock, (ssl.SSLSocket, gevent.ssl.SSLSocket)):  # recvmsg would bypass TLS
                self._read_in_greenlet(sock, stall_timeout)
                self._finish_in_greenlet(sock)
            else:
                _Stream(self, sock).wait(self.loop, stall_timeout)
                self._finish_after_done(sock._sock)
        finally:  # back to the pool when the body ended and the server keeps the connection; else closed
            resp.release()
        return self.blocks

    def _header_read_stamp(self) -> float:
        """When the body bytes that came with the headers arrived: the kernel's time of the header read
        where the connection is a :class:`StampedSocket`, else the clock now."""
        sock = self.response._sock
        delay = getattr(sock, "delay_s", None)
        if delay is None or not self.response._body_buffer:
            return self.clock()
        self._note_delay(delay, block=0)
        return sock.arrived

    def _note_delay(self, delay: float, block: int | None) -> None:
        """Keep a read's stamping delay for the self-check; mark the block it added (if any) late when it was."""
        self.delays_s.append(delay)
        if block is not None and delay > self.late_s:
            self.late_blocks.add(block)

    def _finish_after_done(self, raw: socket.socket) -> None:
        """After ``[DONE]``, take the end of the body if it is already here, so the connection can be reused.

        Servers write the chunked body's terminator right after ``[DONE]``; a read that stopped
        between the two would leave the connection unusable (closed, and the next request pays a
        new connection), as no client that reads to the end of the body does.
        """
        resp = self.response
        if resp.message_complete or resp._sock is None:
            return
        try:
            data = raw.recv(resp.block_size)
        except OSError:  # not here yet (BlockingIOError), or the connection broke: closed at release
            return
        if data:
            resp.feed(data)
            del resp._body_buffer[:]  # after [DONE]: nothing there is read

    def _finish_in_greenlet(self, sock) -> None:
        """After ``[DONE]``, read the end of the body, which servers write right after it, waiting at
        most ``FINISH_WAIT_S``, so the connection can be reused.

        Over TLS the end comes in a record of its own, usually after the ``[DONE]`` record was read;
        left unread, the connection was closed and every request paid a new TCP and TLS handshake
        inside its TTFT (160 requests, 160 connections, before this).
        """
        resp = self.response
        with gevent.Timeout(FINISH_WAIT_S, False):
            while not resp.message_complete and resp._sock is not None:
                data = sock.recv(resp.block_size)
                if not data:
                    break
                resp.feed(data)
        del resp._body_buffer[:]  # after [DONE]: nothing there is read

    def take(self, data: bytes, t: float) -> tuple[bool, bool]:
        """Feed one read's bytes, stamped ``t``: (did it add a block of body, has the body ended)."""
        if not data:
            return False, True
        resp = self.response
        resp.feed(data)
        block = self._take_buffered(t)
        if block is None:
            return False, resp.message_complete
        return True, resp.message_complete or (b"[DONE]" in block and self._done())

    def _take_buffered(self, t: float) -> bytes | None:
        """Move the body bytes the parser holds into a block stamped ``t``; the block (None: there were none)."""
        buffered = self.response._body_buffer
        if not buffered:
            return None
        block = bytes(buffered)
        del buffered[:]
        self.blocks.append((t, block))
        return block

    def _done(self) -> bool:
        """Did the newest block bring a ``data: [DONE]`` line (cheap substring test first)?"""
        if not self.blocks or b"[DONE]" not in self.blocks[-1][1]:
            return False
        body = b"".join(block for _t, block in self.blocks)
        return has_done_line(body, since=len(body) - len(self.blocks[-1][1]))

    def _read_in_greenlet(self, sock, stall_timeout: float) -> None:
        """TLS or no epoll: the socket's own blocking reads, in this greenlet.

        Stamped by the socket where it keeps the kernel's arrival time (:class:`StampedSSLSocket`,
        :class:`StampedSocket`: ``arrived``, ``delay_s``), else by the clock after the read.
        """
        size, clock = self.response.block_size, self.clock
        while True:
            with gevent.Timeout(stall_timeout, StallTimeout(f"timed out: no byte for {stall_timeout:g} s")):
                data = sock.recv(size)
            t = clock()
            arrived, delay = getattr(sock, "arrived", None), getattr(sock, "delay_s", None)
            added, ended = self.take(data, t if arrived is None else arrived)
            if delay is not None:
                self._note_delay(delay, block=len(self.blocks) - 1 if added else None)
            if ended:
                return


def has_done_line(body: bytes | bytearray, since: int = 0) -> bool:
    """Has a ``data: [DONE]`` line (any spacing) arrived, in a line that ends at or after offset ``since``?"""
    return _DONE_LINE.search(body, body.rfind(b"\n", 0, since) + 1) is not None


class _Stream:
    """One body being read by the ReadLoop, which calls :meth:`on_readable` when its socket is readable.

    :meth:`on_readable` runs once per chunk of every stream: no block counting, and the
    ``[DONE]`` search only in a block that holds the substring (docs/benchmarks.md measures
    what a chunk costs).
    """

    def __init__(self, reads: SocketReads, sock) -> None:
        self.reads = reads
        self.raw = sock._sock  # gevent's wrapper holds the real, non-blocking socket
        self.fd = self.raw.fileno()
        self.size = reads.response.block_size
        self.clock = reads.clock
        self.last_read = reads.clock()
        self.error: BaseException | None = None
        self.ended = Event()
        stamping = getattr(sock, "stamping", None)  # a StampedSocket asked for kernel stamps when it was made
        self.kernel_stamps = _ask_for_kernel_stamps(self.raw) if stamping is None else stamping

    def wait(self, loop: ReadLoop, stall_timeout: float) -> None:
        """Sleep until the body ended, the read broke, or no byte came for ``stall_timeout`` s."""
        loop.add(self)
        try:
            while not self.ended.wait(max(0.0, self.last_read + stall_timeout - self.clock())):
                if self.clock() - self.last_read >= stall_timeout:
                    raise StallTimeout(f"timed out: no byte for {stall_timeout:g} s")
        finally:
            loop.remove(self)
        if self.error is not None:
            raise self.error

    def on_readable(self) -> float | None:
        """Read what is there, stamp it first, feed it; never raises into the loop.

        Returns the read's stamping delay (0 where the kernel gave no stamp) when it added a block, else None.
        """
        if self.ended.is_set():
            return None
        reads = self.reads
        try:
            if self.kernel_stamps:
                data, ancillary, _flags, _addr = self.raw.recvmsg(self.size, _ANCILLARY)
                t = self.last_read = self.clock()
                late = kernel_delay(ancillary)
                if late is None:
                    late = 0.0
                else:
                    reads.delays_s.append(late)
            else:
                data = self.raw.recv(self.size)
                t = self.last_read = self.clock()
                late = 0.0
            added, ended = reads.take(data, t - late)
        except BlockingIOError:
            return None
        except Exception as exc:  # reset, parse error: the user's greenlet raises it
            self.error = exc
            added, ended, late = False, True, None
        if ended:
            self.ended.set()
        return late if added else None


def kernel_delay(ancillary: list) -> float | None:
    """Seconds since the kernel had the newest bytes of a read (None where it did not say).

    The only control message asked for is the receive timestamp, so it is the first one.
    """
    now = _wall_ns(_REALTIME)
    if not ancillary:
        return None
    level, kind, raw = ancillary[0]
    if kind != SO_TIMESTAMPNS or level != socket.SOL_SOCKET or len(raw) < _TIMESPEC.size:
        return None
    sec, nsec = _unpack_timespec(raw)
    return max(0.0, (now - sec * 1_000_000_000 - nsec) * 1e-9)


def _ask_for_kernel_stamps(raw: socket.socket) -> bool:
    try:
        raw.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    except OSError:
        return False
    return True


class StampedSocket(gevent.socket.socket):
    """A client connection whose every ``recv`` keeps the kernel's arrival time of the bytes it returned.

    geventhttpclient reads a response's headers with ``recv``, in the user's greenlet. A server that
    holds its headers back until the first token (llmslo's own ingress does: it decides the status
    there) delivers the first token in that same read, and in a burst the user's greenlet gets to
    it late: at 256 lockstep streams the clock stamp taken after it was 0.27 ms late at p50 and
    6.8 ms at p99 (docs/benchmarks.md), unseen by the self-check. ``arrived`` (clock; None: the
    kernel gave no time) and ``delay_s`` describe the newest ``recv``; the body reads that follow
    go through the raw socket.
    """

    __slots__ = ("arrived", "delay_s", "stamping")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.arrived: float | None = None
        self.delay_s: float | None = None
        self.stamping = _ask_for_kernel_stamps(self._sock)  # once per connection, not per request

    def recv(self, size: int, flags: int = 0) -> bytes:
        data, ancillary, _flags, _addr = self.recvmsg(size, _ANCILLARY, flags)
        now = time.perf_counter()
        self.delay_s = kernel_delay(ancillary)
        self.arrived = None if self.delay_s is None else now - self.delay_s
        return data


class StampedSSLSocket(gevent.ssl.SSLSocket):
    """A TLS client connection whose every ``recv`` keeps the kernel's arrival time of the record it returned.

    ``recvmsg`` would bypass TLS, so before each read that goes to the kernel a one-byte peek
    (``MSG_PEEK``, nothing consumed) asks for the arrival time of the bytes waiting: as for a
    plain read, the newest (the kernel merges what waits in one socket and keeps the newest
    time). A read that needs more bytes than were waiting (a record without data such as TLS
    1.3's session tickets, or a record whose end is still on its way) waits and peeks again, so
    the stamp is the arrival of the bytes that completed the record. A TLS read decrypts one
    record, so records that waited together are read one by one under one kernel time: they get
    the very same stamp. Bytes TLS already holds decrypted (``pending``) keep the stamp of the
    record read last. The header read and the body reads both go through it.
    Linux only (``SO_TIMESTAMPNS``); made by :class:`StampingClientPool` through the TLS context's
    ``sslsocket_class``, the standard library's hook for a custom socket class.
    """

    arrived: float | None = None  # clock time of the newest recv's bytes (None: not known)
    delay_s: float | None = None  # its stamping delay
    _kernel_time: bytes | None = None
    _stamping: bool | None = None

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        if self.pending():  # decrypted already: the record read last, its stamp
            return super().recv(buflen, flags)
        if self._stamping is None:
            self._stamping = _ask_for_kernel_stamps(self._sock)
        if not self._stamping:
            return super().recv(buflen, flags)
        timeout = self.gettimeout()
        self.settimeout(0.0)  # a record that needs more bytes comes back here, to be stamped by their arrival
        try:
            while True:
                try:
                    self._stamp(_peek(self._sock))
                except BlockingIOError:  # nothing waiting yet
                    gevent.socket.wait_read(self.fileno(), timeout=timeout)
                    continue
                try:
                    return super().recv(buflen, flags)
                except ssl.SSLWantReadError:  # a record without data (session tickets), or one still on its way
                    continue
                except ssl.SSLWantWriteError:
                    gevent.socket.wait_write(self.fileno(), timeout=timeout)
        finally:
            self.settimeout(timeout)

    def _stamp(self, peeked: tuple[bytes, float] | None) -> None:
        now = time.perf_counter()
        if peeked is None:
            self.arrived = self.delay_s = self._kernel_time = None
        elif peeked[0] != self._kernel_time:  # new bytes (the same kernel time: still the bytes stamped last)
            self._kernel_time, self.delay_s = peeked
            self.arrived = now - self.delay_s


def _peek(raw: socket.socket) -> tuple[bytes, float] | None:
    """(the kernel's raw arrival time, the stamping delay) of the bytes waiting in ``raw``; None: not known.
    Raises BlockingIOError when nothing waits."""
    _data, ancillary, _flags, _addr = raw.recvmsg(1, _ANCILLARY, socket.MSG_PEEK)
    delay = kernel_delay(ancillary)
    return None if delay is None else (ancillary[0][2], delay)


class _StampedConnectionPool(ConnectionPool):
    def _create_tcp_socket(self, family: int, socktype: int, protocol: int) -> gevent.socket.socket:
        return StampedSocket(family, socktype, protocol)  # the pool's documented socket factory


class StampingClientPool(HTTPClientPool):
    """geventhttpclient's per-host client pool, whose connections keep the kernel's arrival times:
    plain TCP ones are :class:`StampedSocket`, TLS ones (Linux) :class:`StampedSSLSocket`.

    geventhttpclient 2.6's ``HTTPClient`` builds its connection pool itself, with no parameter for
    the pool's class, so the plain one is turned into its subclass (``_create_tcp_socket``, the
    factory geventhttpclient documents for overriding) before the first connection is made; a TLS
    pool's context gets the socket class. tests/test_loadtest_stamping.py proves the stamps are
    the kernel's.
    """

    def get_client(self, url):
        client = super().get_client(url)
        pool = client._connection_pool
        if type(pool) is ConnectionPool:
            pool.__class__ = _StampedConnectionPool
        elif isinstance(pool, SSLConnectionPool) and _LINUX:
            pool.ssl_context.sslsocket_class = StampedSSLSocket
        return client
