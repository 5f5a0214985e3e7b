"""Which Host headers the server answers (DNS-rebinding protection): one rule for every transport.

A page on a rebinding domain (evil.example resolving to 127.0.0.1) reaches a developer's local
server with `Host: evil.example`: a server bound to loopback therefore answers loopback names
only, unless `server.allowed_hosts` lists the names it serves.
"""

from __future__ import annotations

import ipaddress


def host_name(host_header: str) -> str:
    """The name part of a Host header: no port, no IPv6 brackets, lower case, no trailing dot."""
    host = host_header.strip().lower()
    if host.startswith("["):  # [::1] or [::1]:7000
        end = host.find("]")
        return host[1:end] if end > 0 else host
    name, colon, port = host.rpartition(":")
    if colon and name and ":" not in name and (port.isascii() and port.isdigit() or port == ""):
        host = name
    return host.rstrip(".")


def is_loopback_name(name: str) -> bool:
    """localhost, *.localhost, 127.0.0.0/8 and ::1."""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class HostFilter:
    """Built once from the settings; `allows` is called for every request and handshake."""

    __slots__ = ("_names", "_suffixes", "_any", "_loopback_only")

    def __init__(self, allowed_hosts: tuple[str, ...], bind_host: str) -> None:
        names = [host_name(entry) for entry in allowed_hosts if entry.strip()]
        self._any = "*" in names
        # "*.example.com" (or ".example.com") also serves every subdomain of example.com
        self._suffixes = tuple("." + n.lstrip("*.") for n in names if n.startswith(("*.", ".")))
        self._names = frozenset(n.lstrip("*.") if n.startswith(("*.", ".")) else n for n in names)
        # nothing listed: a loopback-bound server answers loopback names only, any other any Host
        self._loopback_only = not names and is_loopback_name(host_name(bind_host))

    def allows(self, host_header: str | None) -> bool:
        if self._any or (not self._names and not self._loopback_only):
            return True
        if not host_header:
            # HTTP/1.0 without Host: not something a browser (hence a rebinding page) sends
            return True
        name = host_name(host_header)
        if self._loopback_only:
            return is_loopback_name(name)
        return name in self._names or name.endswith(self._suffixes)
