"""Engine lifecycle: when Serve stops a replica, its engine's ``shutdown`` stops what ``start``
launched. Here a stand-in ``vllm`` executable (a real child process with a worker of its own, like
vLLM's tensor-parallel workers) is launched by the upstream engine and must be gone afterwards."""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
from pathlib import Path

import pytest

from serve.engines.upstream import UpstreamEngine
from serve.model import ModelServer

FAKE_VLLM = textwrap.dedent('''\
    #!{python}
    """Stand-in for `vllm serve`: /health answers, and a worker process lives as long as we do."""
    import http.server, subprocess, sys
    port = int(sys.argv[sys.argv.index("--port") + 1])
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    open(sys.argv[-1], "w").write(str(worker.pid))

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

    http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
''')


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie waiting for its parent counts as gone
        return stat.read().split(")")[-1].split()[0] != "Z"


@pytest.fixture
def fake_vllm(tmp_path: Path) -> tuple[str, Path]:
    script = tmp_path / "vllm"
    script.write_text(FAKE_VLLM.format(python=sys.executable))
    script.chmod(0o755)
    return str(script), tmp_path / "worker.pid"


def test_shutdown_stops_the_launched_server_and_its_workers(fake_vllm):
    executable, worker_file = fake_vllm
    engine = UpstreamEngine("m", launch={"model_path": "/models/m", "executable": executable,
                                         "ready_timeout_s": 60, "extra_args": [str(worker_file)]})

    async def lifecycle() -> tuple[int, int]:
        await engine.start()
        server, worker = engine._process.pid, int(worker_file.read_text())
        assert alive(server) and alive(worker)
        await engine.shutdown()
        await engine.shutdown()  # idempotent: Serve may call it after a failed start too
        return server, worker

    server, worker = asyncio.run(lifecycle())
    for _ in range(50):  # the orphaned worker is reaped by init shortly after the group's SIGTERM
        if not alive(worker):
            break
        asyncio.run(asyncio.sleep(0.1))
    assert not alive(server) and not alive(worker)


# Serve awaits the async __del__ (call_destructor); Python's own GC later calls it again without awaiting.
@pytest.mark.filterwarnings("ignore:coroutine 'ModelServer.__del__' was never awaited:RuntimeWarning")
def test_replica_exit_shuts_its_engine_down():
    calls = []

    class Engine:
        async def shutdown(self) -> None:
            calls.append("shutdown")

    replica = ModelServer.__new__(ModelServer)  # what Serve holds after __init__
    replica.engine = Engine()
    asyncio.run(replica.__del__())
    assert calls == ["shutdown"]
    asyncio.run(ModelServer.__new__(ModelServer).__del__())  # __init__ failed before the engine existed
