"""`make ui-check`'s DevTools client (the websocket it speaks to headless Chromium), against a
local websocket server standing in for Chromium: the handshake, masked client frames, events
skipped, the reply matched by id, a message split over frames, a long (16-bit length) frame."""

from __future__ import annotations

import json
import socket
import struct
import threading

import pytest

from tools.ui_check import DevTools


def _frame(payload: bytes, fin: bool = True, opcode: int = 1) -> bytes:
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    head += bytes([n]) if n < 126 else bytes([126]) + struct.pack(">H", n)
    return head + payload


def _read_client_frame(conn: socket.socket) -> dict:
    b1, b2 = conn.recv(2, socket.MSG_WAITALL)
    assert b1 == 0x81 and b2 & 0x80, "a client frame is one masked text frame"
    n = b2 & 0x7F
    if n == 126:
        n = struct.unpack(">H", conn.recv(2, socket.MSG_WAITALL))[0]
    mask = conn.recv(4, socket.MSG_WAITALL)
    data = conn.recv(n, socket.MSG_WAITALL)
    return json.loads(bytes(b ^ mask[i % 4] for i, b in enumerate(data)))


@pytest.fixture
def chromium_stand_in():
    server = socket.create_server(("127.0.0.1", 0))
    seen: list[dict] = []

    errors: list[BaseException] = []

    def serve():
        conn, _ = server.accept()
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += conn.recv(1)
        assert b"Upgrade: websocket" in head and b"Sec-WebSocket-Key:" in head
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        msg = _read_client_frame(conn)
        seen.append(msg)
        conn.sendall(_frame(json.dumps({"method": "Page.loadEventFired", "params": {}}).encode()))
        reply = json.dumps({"id": msg["id"], "result": {"data": "x" * 300}}).encode()
        conn.sendall(_frame(reply[:100], fin=False) + _frame(reply[100:], opcode=0))
        msg = _read_client_frame(conn)
        seen.append(msg)
        conn.sendall(_frame(json.dumps({"id": msg["id"], "error": {"message": "no such method"}}).encode()))
        conn.close()

    def run():  # an assertion in this thread is carried to the test, which a thread's own would not fail
        try:
            serve()
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield f"ws://127.0.0.1:{server.getsockname()[1]}/devtools/page/1", seen
    thread.join(timeout=10)
    server.close()
    assert not thread.is_alive(), "the stand-in never saw the client's second call"
    if errors:
        raise errors[0]


def test_calls_are_answered_by_id_past_events_and_frames(chromium_stand_in):
    url, seen = chromium_stand_in
    tools = DevTools(url)
    assert tools.call("Page.captureScreenshot", format="png") == {"data": "x" * 300}
    with pytest.raises(RuntimeError, match="Nope.method: {'message': 'no such method'}"):
        tools.call("Nope.method", expression="1" * 200)  # a 16-bit length frame
    assert [m["method"] for m in seen] == ["Page.captureScreenshot", "Nope.method"]
    assert seen[0]["params"] == {"format": "png"} and [m["id"] for m in seen] == [1, 2]
