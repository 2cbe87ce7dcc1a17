"""Outbound requests (image URLs, webhooks) reach only public addresses unless the operator allows more."""

from __future__ import annotations

import functools
import ipaddress
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import certifi
import httpx

from .errors import InvalidInput

_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


def embedded_ipv4(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries and that a router may forward to: mapped (::ffff:a.b.c.d),
    IPv4-compatible (::a.b.c.d, RFC 4291), 6to4 (2002::/16, RFC 3056), NAT64 (RFC 6052), Teredo."""
    if addr.version == 4:
        return None
    assert isinstance(addr, ipaddress.IPv6Address)
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr.teredo is not None:
        return addr.teredo[1]
    if any(addr in net for net in _NAT64) or (int(addr) >> 32 == 0 and int(addr) > 1):
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


def is_public(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Global unicast, and so is any IPv4 address it embeds."""
    if not addr.is_global or addr.is_multicast:
        return False
    inner = embedded_ipv4(addr)
    return inner is None or (inner.is_global and not inner.is_multicast)


@dataclass(frozen=True)
class Pinned:
    """A request to send to the address that was checked, not to whatever the name resolves to next:
    the URL's host is that address, Host and TLS SNI (so certificate checks) keep the name."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)
    extensions: dict[str, Any] = field(default_factory=dict)


def refused(param: str, code: str) -> InvalidInput:
    """One message for every refused destination: private, unresolvable or odd, nothing to probe with."""
    return InvalidInput(
        f"{param}: this server only connects to public http(s) addresses; the URL was refused.",
        param=param,
        code=code,
    )


def pin_public_url(url: str, *, param: str, allow_private: bool, code: str) -> Pinned:
    """Resolve once, check every address, and aim the request at the first one (DNS rebinding can't
    swap in a private address between the check and the connection)."""
    addresses = check_public_url(url, param=param, allow_private=allow_private, code=code)
    target = httpx.URL(url)
    host = target.host
    if allow_private or host in addresses:  # allowed anywhere, or already a checked address
        return Pinned(url)
    address = addresses[0]
    authority = host if target.port is None else f"{host}:{target.port}"
    return Pinned(str(target.copy_with(host=address)), {"Host": authority}, {"sni_hostname": host})


def check_public_url(url: str, *, param: str, allow_private: bool, code: str) -> list[str]:
    """http(s) only; every address the host resolves to must be global (not loopback, private,
    link-local...). Returns those addresses (none are looked up when private ones are allowed)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # "http://[::1", a port out of range
        raise InvalidInput(f"{param} is not a valid URL ({exc}).", param=param, code=code) from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput(
            f"{param} must be an http(s) URL; got scheme {parts.scheme!r}."
            if parts.scheme
            else f"{param} is not a URL.",
            param=param,
            code=code,
        )
    if allow_private:
        return []
    try:
        infos = socket.getaddrinfo(parts.hostname, port or 443, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise refused(param, code) from exc
    addresses = [str(info[4][0]).split("%")[0] for info in infos]
    if not addresses or not all(is_public(ipaddress.ip_address(a)) for a in addresses):
        raise refused(param, code)
    return addresses


def check_peer(response: Any, *, param: str) -> None:
    """The address actually connected to must be public too: a host that re-resolves (DNS rebinding)
    between the check and the connection is refused before its body is read."""
    stream = response.extensions.get("network_stream")
    peer = stream.get_extra_info("server_addr") if stream is not None else None
    if not peer:
        return  # not a socket (tests' mock transports)
    addr = ipaddress.ip_address(str(peer[0]).split("%")[0])
    if not is_public(addr):
        raise refused(param, "invalid_image_url")


@functools.cache
def tls() -> ssl.SSLContext:
    """The one client TLS context (certifi's roots, as httpx's default): a new httpx client loads the CA
    bundle again unless given it, about 20 ms of CPU for each image fetch or webhook."""
    return ssl.create_default_context(cafile=certifi.where())
