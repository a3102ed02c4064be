"""A bare MQTT-over-TLS client for sending what no SDK would send (blocking, test-only)."""

from __future__ import annotations

import socket
import ssl
import time
from types import TracebackType

from simulator import Simulator
from simulator import mqtt_codec as mqtt


class RawClient:
    def __init__(self, sim: Simulator, timeout: float = 5.0) -> None:
        context = ssl.create_default_context(cafile=str(sim.ca_cert_path))
        raw = socket.create_connection((sim.host, 8883), timeout=timeout)
        self._sock = context.wrap_socket(raw, server_hostname=sim.host)
        self._buffer = b""
        self._sim = sim

    def __enter__(self) -> RawClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._sock.close()

    def send(self, data: bytes) -> None:
        self._sock.sendall(data)

    def send_packet(self, packet: mqtt.Packet) -> None:
        self.send(mqtt.encode(packet))

    def receive(self) -> mqtt.Packet | None:
        """The next packet, or None once the server has closed the connection."""
        while True:
            decoded = mqtt.decode(self._buffer)
            if decoded is not None:
                packet, used = decoded
                self._buffer = self._buffer[used:]
                return packet
            try:
                chunk = self._sock.recv(65536)
            except (ConnectionError, ssl.SSLError):
                return None
            if not chunk:
                return None
            self._buffer += chunk

    def connect(
        self, device: str, module: str, *, password: str | None = None, username: str | None = None
    ) -> mqtt.Packet | None:
        token = password or self._sim.module_sas_token(device, module, int(time.time()) + 600)
        self.send_packet(
            mqtt.Connect(
                client_id=f"{device}/{module}",
                username=username or f"{self._sim.host}/{device}/{module}/?api-version=2019-10-01",
                password=token,
                clean_session=False,
                keep_alive=60,
            )
        )
        return self.receive()
