"""Compatibility import path of the original Maru client (``from maru_handler import MaruHandler``)."""

from maru import MaruConfig, MaruHandler

__all__ = ["MaruConfig", "MaruHandler"]
