"""Offline IoT Hub + edgeHub stand-in for laptops, demos and tests. Never for production."""

from simulator.core import HubEvent, UpstreamMessage
from simulator.errors import ServiceError
from simulator.hub import Simulator, SimulatorFaults, pick_loopback_host
from simulator.storage import StorageRoute
from simulator.topics import Message

__all__ = [
    "HubEvent",
    "Message",
    "ServiceError",
    "Simulator",
    "SimulatorFaults",
    "StorageRoute",
    "UpstreamMessage",
    "pick_loopback_host",
]
