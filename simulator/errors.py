"""The one error the service side answers with."""

from __future__ import annotations


class ServiceError(Exception):
    """A service request IoT Hub would refuse; `status` and `code` go into the HTTP answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
