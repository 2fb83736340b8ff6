"""Failures of the HTTP transport: the exchange itself broke, whatever the server meant to answer.

An HTTP error status is not one of these: a 429 or a 500 is a response, read
like any other. These say that no complete response came.
"""

from __future__ import annotations


class TransportError(Exception):
    """Base of every failure to exchange a request and a response."""


class ConnectError(TransportError):
    """The server could not be reached: refused, unknown host, or no answer within the connect timeout."""


class ReadTimeout(TransportError, TimeoutError):
    """The server sent nothing for longer than the read timeout."""


class RemoteProtocolError(TransportError):
    """The server broke HTTP: closed the connection mid-response, or sent bytes that do not parse."""


class PoolTimeout(TransportError, TimeoutError):
    """Every connection stayed busy for longer than the pool timeout."""
