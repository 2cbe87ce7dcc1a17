"""Outbound requests (image URLs, webhooks) reach only public addresses unless the operator allows more."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

from .errors import InvalidInput


def check_public_url(url: str, *, param: str, allow_private: bool, code: str) -> None:
    """http(s) only; every address the host resolves to must be global (not loopback, private, link-local...)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput(
            f"{param} must be an http(s) URL; got scheme {parts.scheme!r}."
            if parts.scheme
            else f"{param} is not a URL.",
            param=param,
            code=code,
        )
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 443, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise InvalidInput(f"{param}: cannot resolve host {parts.hostname!r}.", param=param, code=code) from exc
    for info in infos:
        addr = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if not addr.is_global or addr.is_multicast:
            raise InvalidInput(
                f"{param}: {parts.hostname!r} resolves to a private, loopback or link-local address, "
                "which this server does not connect to.",
                param=param,
                code=code,
            )


def check_peer(response: Any, *, param: str) -> None:
    """The address actually connected to must be public too: a host that re-resolves (DNS rebinding)
    between the check and the connection is refused before its body is read."""
    stream = response.extensions.get("network_stream")
    peer = stream.get_extra_info("server_addr") if stream is not None else None
    if not peer:
        return  # not a socket (tests' mock transports)
    addr = ipaddress.ip_address(str(peer[0]).split("%")[0])
    if not addr.is_global or addr.is_multicast:
        raise InvalidInput(
            f"{param}: the connection went to a private address ({addr}), which this server does not fetch from.",
            param=param,
            code="invalid_image_url",
        )
