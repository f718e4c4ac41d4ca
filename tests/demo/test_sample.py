"""The sample exchange `loraserve demo` prints: it waits for /health, asks every model the
same question at once, and prints one aligned line each (against a stub server here; the
slow test in test_demo.py reads it from the real demo)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from loraserve.demo import sample


class Stub(BaseHTTPRequestHandler):
    """/health (503 for the first `unhealthy` calls), and chat replies naming the model."""

    unhealthy: ClassVar[int] = 2
    asked: ClassVar[list[dict]] = []

    def do_GET(self) -> None:
        healthy = Stub.unhealthy <= 0
        Stub.unhealthy -= 1
        self._reply(200 if healthy else 503, {})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Stub.asked.append(body)
        if body["model"] == "broken":
            self._reply(500, {"error": {"message": "boom"}})
            return
        reply = f"{body['model']} says hi"
        self._reply(200, {"choices": [{"message": {"role": "assistant", "content": reply}}]})

    def _reply(self, status: int, data: dict) -> None:
        payload = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:  # quiet
        pass


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    Stub.unhealthy, Stub.asked = 2, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(sample, "READY_TIMEOUT_S", 20.0)
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_prints_every_models_reply_once_the_server_is_healthy(stub: int) -> None:
    printed: list[str] = []
    thread = sample.start_sample("0.0.0.0", stub, ["smollm2", "caps", "pirate"], printed.append)
    thread.join(30)
    assert not thread.is_alive()
    assert printed == [
        f"\nAsked {sample.SAMPLE_QUESTION!r}, greedy:\n"
        "smollm2: smollm2 says hi\n   caps: caps says hi\n pirate: pirate says hi\n"
    ]
    assert {body["model"] for body in Stub.asked} == {"smollm2", "caps", "pirate"}
    for body in Stub.asked:
        assert body["messages"] == [{"role": "user", "content": sample.SAMPLE_QUESTION}]
        assert body["temperature"] == 0


def test_a_failed_request_is_reported_in_one_line(stub: int) -> None:
    printed: list[str] = []
    sample.start_sample("127.0.0.1", stub, ["caps", "broken"], printed.append).join(30)
    assert len(printed) == 1 and printed[0].startswith("(no sample exchange: ")


def test_gives_up_quietly_when_the_server_never_comes_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sample, "READY_TIMEOUT_S", 0.5)
    printed: list[str] = []
    sample.start_sample("127.0.0.1", 9, ["caps"], printed.append).join(10)  # port 9: discard
    assert printed == []


@pytest.mark.parametrize(
    "host, url",
    [
        ("127.0.0.1", "http://127.0.0.1:8000"),
        ("0.0.0.0", "http://127.0.0.1:8000"),
        ("::", "http://127.0.0.1:8000"),
        ("::1", "http://[::1]:8000"),
        ("localhost", "http://localhost:8000"),
    ],
)
def test_local_url(host: str, url: str) -> None:
    assert sample.local_url(host, 8000) == url
