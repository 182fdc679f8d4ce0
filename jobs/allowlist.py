"""Which inputs a worker may read. Worker configuration, never the task message: a list file or
a forged message can name any URI, and the worker would read it with its own rights.

  CUTOUT_ALLOWED_SOURCES      comma-separated URI prefixes. Unset: ``s3://,http://,https://``
                              (every bucket the worker's credentials reach, the public web; no
                              local file). ``file:///data/images/`` allows the files below that
                              folder, judged after resolving symlinks and ``..``;
                              ``s3://bucket/prefix/`` one bucket or prefix; ``https://host``
                              one host. A prefix ends at a ``/`` boundary (``s3://b`` is not
                              ``s3://b2``).
  CUTOUT_ALLOW_PRIVATE_HOSTS  ``1``: HTTP(S) may reach loopback, private, link-local and other
                              non-public addresses. Default: refused, redirects included,
                              checked on the address actually connected to; a host named
                              explicitly in CUTOUT_ALLOWED_SOURCES is allowed.

``cutout run`` does not apply it: it reads with the rights of the user who runs it.
"""
from __future__ import annotations

import ipaddress
import os
import posixpath
import socket
import urllib.parse
from dataclasses import dataclass

from cutout.jobs.errors import SourceNotAllowedError

DEFAULT_ALLOWED = ("s3://", "http://", "https://")


@dataclass(frozen=True)
class SourcePolicy:
    prefixes: tuple[str, ...] = DEFAULT_ALLOWED
    allow_private_hosts: bool = False

    @classmethod
    def from_env(cls) -> "SourcePolicy":
        from cutout.jobs.settings import settings

        listed = settings().allowed_sources
        prefixes = DEFAULT_ALLOWED if listed is None else tuple(p.strip() for p in listed.split(",") if p.strip())
        private = settings().allow_private_hosts
        return cls(tuple(_canonical(p, prefix=True) for p in prefixes), private)

    def check(self, uri: str) -> None:
        """``SourceNotAllowedError`` unless ``uri`` lies below one of the allowed prefixes, both
        as written and once normalised (dot segments, percent-escapes, symlinks resolved)."""
        written, canonical = _written(uri), _canonical(uri)
        if not any(_below(p, written) and _below(p, canonical) for p in self.prefixes):
            raise SourceNotAllowedError(
                f"{uri}: not in the allowlist of sources (CUTOUT_ALLOWED_SOURCES="
                f"{','.join(self.prefixes) or '(empty)'})"
            )

    def private_ok(self, url: str) -> bool:
        """Private addresses are fine when allowed outright, or for a host listed by name."""
        if self.allow_private_hosts:
            return True
        canonical = _canonical(url)
        return any(_names_host(p) and _below(p, canonical) for p in self.prefixes)

    @staticmethod
    def is_private(address: str) -> bool:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return not ip.is_global or ip.is_multicast

    def check_address(self, url: str, address: str) -> None:
        """Called with the address a connection actually reached (so DNS tricks do not help)."""
        if self.is_private(address) and not self.private_ok(url):
            raise SourceNotAllowedError(
                f"{url}: {address} is a private, loopback or link-local address "
                "(set CUTOUT_ALLOW_PRIVATE_HOSTS=1 or list the host in CUTOUT_ALLOWED_SOURCES)"
            )

    def check_resolved(self, url: str) -> None:
        """Behind a proxy the peer is the proxy: check what the target name resolves to."""
        host = urllib.parse.urlsplit(url).hostname or ""
        try:
            infos = socket.getaddrinfo(host, None)
        except OSError:
            return  # the proxy will fail to resolve it too
        for info in infos:
            self.check_address(url, info[4][0])


def _written(uri: str) -> str:
    """The URI as the reader will use it, with local paths spelt as absolute file:// URIs."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme in ("", "file"):
        path = uri[7:] if scheme else uri
        if path.startswith("localhost/"):
            path = path[len("localhost"):]
        return "file://" + (os.path.abspath(path) if path else "/")
    return scheme + uri[len(scheme):]


def _canonical(uri: str, *, prefix: bool = False) -> str:
    written = _written(uri)
    scheme, _, rest = written.partition("://")
    if scheme == "file":
        path = os.path.realpath(rest)
        return "file://" + (path.rstrip("/") + "/" if prefix and rest.endswith("/") else path)
    if scheme == "s3":
        bucket, slash, key = rest.partition("/")
        return f"s3://{bucket}{slash}{_normpath(key, keep_trailing=prefix)}" if slash else f"s3://{bucket}"
    parts = urllib.parse.urlsplit(written)
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ":invalid"
    host = (parts.hostname or "") + port
    path = _normpath(parts.path, keep_trailing=prefix) if parts.path else ""
    return f"{scheme}://{host}{path}"


def _normpath(path: str, *, keep_trailing: bool) -> str:
    decoded = urllib.parse.unquote(path)
    if not decoded:
        return ""
    normal = posixpath.normpath("/" + decoded.lstrip("/"))[1:] if not decoded.startswith("/") else \
        posixpath.normpath(decoded)
    if normal.startswith("//"):
        normal = "/" + normal.lstrip("/")
    if keep_trailing and decoded.endswith("/") and not normal.endswith("/"):
        normal += "/"
    return "" if normal == "." else normal


def _below(prefix: str, uri: str) -> bool:
    if prefix.endswith("/"):
        return uri.startswith(prefix)
    return uri == prefix or uri.startswith(prefix + "/")


def _names_host(prefix: str) -> bool:
    scheme, _, rest = prefix.partition("://")
    return scheme in ("http", "https") and bool(rest.split("/", 1)[0])
