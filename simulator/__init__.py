"""Offline IoT Hub + edgeHub stand-in for laptops, demos and tests. Never for production."""
