"""A real `tuner ui` server on a free loopback port, in a thread of the test process (uvicorn, not a test client)."""

from __future__ import annotations

import threading
import time

import pytest


class Served:
    def __init__(self, app, server, thread):
        self.app, self.server, self.thread = app, server, thread
        port = server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.app.state.queue.close()


@pytest.fixture
def serve_app():
    """serve_app(runs_dir, auth=None, max_upload_mb=25) -> Served; every server is stopped at teardown."""
    pytest.importorskip("fastapi")
    uvicorn = pytest.importorskip("uvicorn")
    from tuner.ui.server import create_app

    started: list[Served] = []

    def start(runs_dir, auth=None, max_upload_mb=25.0) -> Served:
        app = create_app(runs_dir, auth, max_upload_mb)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the tuner ui server did not start")
            time.sleep(0.05)
        served = Served(app, server, thread)
        started.append(served)
        return served

    yield start
    for served in started:
        if not served.server.should_exit:
            served.close()
