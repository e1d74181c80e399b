"""Where a request's TTFT went: the client's measurement split by the server's own per-hop timing.

The llmslo server reports, in ``usage.llmslo_timing`` (contract/timing.py), when
its ingress received the request and when each later milestone happened (seconds
from that receipt). With the client's TTFT the whole path adds up:

    client TTFT = client_network + ingress + routing + queue + prefill + relay

client_network: the client's send -> the ingress, plus the first byte's way back
(Ray's HTTP proxy both ways, the loopback or network, the client's own stamping);
ingress: the ingress's own work before dispatch (body read, validation, media decoding,
token count); routing: dispatch -> model replica (Ray's router and the hop);
queue: the engine's own queue; prefill: the rest until the engine's first token;
relay: engine's first token -> the ingress handing it to the HTTP server.
Servers that send no timing leave these empty (NOT MEASURED, never guessed).
"""

from __future__ import annotations

from contract import timing as T
from contract.names import TTFT_HOPS
from contract.record import RequestRecord
from loadtest._stats import percentile

HOPS = ("client_network", *TTFT_HOPS)


def split(rec: RequestRecord) -> dict[str, float] | None:
    """The request's TTFT by hop, or None when it failed or the server sent no complete timing."""
    t = rec.server_timing
    if not rec.ok or rec.ttft_s is None or not t or any(t.get(k) is None for k in T.FIELDS[1:]):
        return None
    return {"client_network": rec.ttft_s - t[T.INGRESS_FIRST_BYTE], **T.server_hops(t)}


def overhead(rec: RequestRecord) -> float | None:
    """Serving-path TTFT overhead: client TTFT minus the engine's own (queue + prefill); None without timing."""
    hops = split(rec)
    return None if hops is None else hops["client_network"] + hops["ingress"] + hops["routing"] + hops["relay"]


def by_level(records: list[RequestRecord]) -> dict[int, dict]:
    """Per level: how many requests carried timing, and p50/p95 of each hop (seconds, exact)."""
    out: dict[int, dict] = {}
    for level in sorted({r.level for r in records}):
        splits = [s for r in records if r.level == level and (s := split(r)) is not None]
        if not splits:
            continue
        out[level] = {"requests": len(splits), **{
            hop: {"p50": percentile([s[hop] for s in splits], 50), "p95": percentile([s[hop] for s in splits], 95)}
            for hop in HOPS}}
    return out


def lines(hops: dict) -> list[str]:
    """One console line per level: 'TTFT by hop (p50 / p95 ms): client_network 1.2 / 3.4, ...'."""
    return [f"TTFT by hop at {level} streams, {row['requests']} requests (p50 / p95 ms): "
            + ", ".join(f"{hop} {row[hop]['p50'] * 1e3:.1f} / {row[hop]['p95'] * 1e3:.1f}" for hop in HOPS)
            for level, row in hops.items()]
