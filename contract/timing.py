"""Names of the per-request timing the server adds to its answers (docs/serve.md, "Per-hop timing").

In the contract because the load test reads these fields to split its TTFT into
hops, and the server writes them.

The object sits at ``usage[USAGE_KEY]``: in the last chunk of a stream that asked for
usage (``stream_options.include_usage``) and in every non-streamed answer. OpenAI
clients ignore it (unknown keys of ``usage`` are kept as extras). Every value is
in seconds; all but the first are durations from the ingress receiving the request,
so they only grow along the path.
"""

USAGE_KEY = "llmslo_timing"

INGRESS_RECEIVED_UNIX = "ingress_received_unix_s"  # wall clock (time.time()) when the ingress began handling it
INGRESS_DISPATCHED = "ingress_dispatched_s"  # -> the ingress handed it to Ray's router (body read, validated, media decoded, tokens counted)
REPLICA_STARTED = "replica_started_s"  # -> the model replica began it (Ray's router and the hop to the replica after dispatch)
ENGINE_QUEUE_WAIT = "engine_queue_wait_s"  # time in the engine's own queue (a duration, not a milestone)
ENGINE_FIRST_TOKEN = "engine_first_token_s"  # -> the engine produced the first token inside the replica
INGRESS_FIRST_BYTE = "ingress_first_byte_s"  # -> the ingress handed the first token's bytes to the HTTP server

FIELDS = (INGRESS_RECEIVED_UNIX, INGRESS_DISPATCHED, REPLICA_STARTED, ENGINE_QUEUE_WAIT, ENGINE_FIRST_TOKEN, INGRESS_FIRST_BYTE)


def server_hops(t: dict[str, float]) -> dict[str, float]:
    """The server's part of a TTFT by hop, in path order (the ``hop`` label values of
    ``ray_llmslo_ttft_hop_seconds``), from a timing object with every field set. Here so the
    server's histogram and the load test's split are one computation."""
    dispatched, started, queue = t[INGRESS_DISPATCHED], t[REPLICA_STARTED], t[ENGINE_QUEUE_WAIT]
    return {
        "ingress": dispatched,
        "routing": started - dispatched,
        "queue": queue,
        "prefill": t[ENGINE_FIRST_TOKEN] - started - queue,
        "relay": t[INGRESS_FIRST_BYTE] - t[ENGINE_FIRST_TOKEN],
    }
