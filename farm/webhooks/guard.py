"""The SSRF guard: webhook destinations must be public unless an operator allowlists them.

A tenant chooses the URL the farm will POST to, so without a guard a tenant could make the
farm reach its own internals (databases, Ray's dashboard, S3) or a cloud metadata service
(169.254.169.254). The guard refuses non-http(s) schemes, credentials in the URL, and any
destination address that is not public unicast: loopback, private (RFC 1918, CGNAT, ULA),
link-local, unspecified, multicast, reserved, and IPv6 forms embedding such IPv4 addresses.

Checks happen at registration and again at every delivery attempt, after DNS resolution:
the request is sent to the resolved, checked IP (with the original ``Host`` header and TLS
SNI name), so a DNS answer that changes between check and connect (DNS rebinding) cannot
redirect it. Redirects are followed by hand and each hop is checked the same way.

Operators may allowlist CIDRs and host names (``WebhookSettings.allow_hosts``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import socket
from collections.abc import Iterable, Sequence

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

SCHEMES = ("http", "https")
MAX_URL_CHARS = 2048
_DEFAULT_PORTS = {"http": 80, "https": 443}
# NAT64 (RFC 6052) embeds an IPv4 address in the low 32 bits.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_LOCALHOST: tuple[IPAddress, ...] = (ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1"))

log = logging.getLogger(__name__)


class UrlRefused(ValueError):
    """The URL is not an allowed webhook destination; the message says why."""


@dataclasses.dataclass(frozen=True)
class Target:
    """A checked destination: where to connect (``ip``) and what to call it (``url``'s host)."""

    url: httpx.URL
    ip: IPAddress

    @property
    def request_url(self) -> httpx.URL:
        """The URL with its host replaced by the checked IP: httpx connects there and nowhere else."""
        return self.url.copy_with(host=str(self.ip))

    @property
    def host_header(self) -> str:
        return self.url.netloc.decode("ascii")

    @property
    def extensions(self) -> dict[str, str]:
        # TLS: offer the real name in SNI and verify the certificate against it, not the IP.
        if self.url.scheme == "https" and not _is_ip_literal(self.url.host):
            return {"sni_hostname": self.url.raw_host.decode("ascii")}
        return {}


def parse_allow_hosts(entries: Iterable[str]) -> tuple[list[IPNetwork], list[str]]:
    """Split allowlist entries into networks and (lower-case) host names; ValueError names a bad one."""
    networks: list[IPNetwork] = []
    names: list[str] = []
    for entry in entries:
        text = entry.strip() if isinstance(entry, str) else ""
        if not text:
            raise ValueError(f"allow_hosts: {entry!r} is empty; use a CIDR like 10.0.0.0/8 or a host name")
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
            continue
        except ValueError:
            pass
        name = text.lower().rstrip(".")
        bare = name.removeprefix("*.")
        if not bare or any(not label or not all(c.isalnum() or c in "-_" for c in label) for label in bare.split(".")):
            raise ValueError(
                f"allow_hosts: {entry!r} is neither a CIDR (10.0.0.0/8, fd00::/8) nor a host name (hooks.internal, *.corp.example)"
            )
        names.append(name)
    return networks, names


def forbidden_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public unicast address, or None when it is."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
        if embedded is not None:
            reason = forbidden_reason(embedded)
            if reason is not None:
                return f"it embeds {embedded}: {reason}"
    for flag, reason in (
        ("is_unspecified", "unspecified"),
        ("is_loopback", "loopback"),
        ("is_link_local", "link-local (e.g. cloud metadata)"),
        ("is_multicast", "multicast"),
        ("is_private", "private"),
        ("is_reserved", "reserved"),
        ("is_site_local", "site-local (fec0::/10)"),  # deprecated, still routed inside some networks
    ):
        if getattr(ip, flag, False):
            return reason
    if not ip.is_global:  # e.g. CGNAT 100.64.0.0/10, documentation ranges
        return "not globally routable"
    return None


class UrlGuard:
    """Checks webhook URLs (or, with another ``subject``, any URL the farm fetches for a tenant) and
    resolves them to addresses that are safe to connect to."""

    def __init__(self, allow_hosts: Sequence[str] = (), *, subject: str = "webhook destinations",
                 setting: str = "webhooks.allow_hosts") -> None:
        self._networks, self._names = parse_allow_hosts(allow_hosts)
        # What refusals call the URLs and the allowlist that would admit them: each user says its own.
        self._subject, self._setting = subject, setting

    @classmethod
    def from_settings(cls, settings) -> UrlGuard:  # settings: WebhookSettings
        return cls(settings.allow_hosts)

    def __repr__(self) -> str:
        return f"UrlGuard(networks={[str(n) for n in self._networks]}, names={self._names})"

    # -- the checks ---------------------------------------------------------------------

    def check_url(self, url: str | httpx.URL) -> httpx.URL:
        """The static checks (no DNS): scheme, credentials, host, port, and an IP-literal host."""
        if isinstance(url, str):
            if len(url) > MAX_URL_CHARS:
                raise UrlRefused(f"is longer than {MAX_URL_CHARS} characters")
            if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F or 0xD800 <= ord(ch) <= 0xDFFF for ch in url):
                raise UrlRefused("contains whitespace, control characters or lone surrogates")
            try:
                parsed = httpx.URL(url)
            except (httpx.InvalidURL, ValueError) as exc:
                raise UrlRefused(f"is not a valid URL ({exc})") from None
        else:
            parsed = url
        if parsed.scheme not in SCHEMES:
            raise UrlRefused(f"scheme {parsed.scheme!r} is not allowed; use http or https")
        if parsed.userinfo:
            raise UrlRefused("must not contain credentials (user:password@)")
        if not parsed.host:
            raise UrlRefused("has no host")
        port = parsed.port
        if port is not None and not 1 <= port <= 65535:
            raise UrlRefused(f"port {port} is out of range; allowed: 1..65535")
        if _is_ip_literal(parsed.host):
            self.check_ip(ipaddress.ip_address(parsed.host))
        elif _is_localhost(parsed.host) and not self._name_allowed(parsed.host):
            self._first_allowed(parsed.host, _LOCALHOST)
        return parsed

    def check_ip(self, ip: IPAddress) -> None:
        if any(ip in net for net in self._networks):
            return
        reason = forbidden_reason(ip)
        if reason is not None:
            raise UrlRefused(f"address {ip} is not allowed ({reason}); {self._subject} must be public addresses")

    async def resolve(self, url: str | httpx.URL) -> Target:
        """Check the URL, resolve its host and return the first address that passes.

        Only addresses that pass are ever connected to, so a name that also resolves to a
        private address is safe to use through its public one.
        """
        parsed = self.check_url(url)
        host = parsed.host
        if _is_ip_literal(host):
            return Target(parsed, ipaddress.ip_address(host))
        if _is_localhost(host):
            addresses = list(_LOCALHOST)  # never asked of DNS (RFC 6761)
        else:
            addresses = await _lookup(parsed)
        if self._name_allowed(host):
            return Target(parsed, addresses[0])
        return Target(parsed, self._first_allowed(host, addresses))

    def _first_allowed(self, host: str, addresses: Sequence[IPAddress]) -> IPAddress:
        reasons = []
        for ip in addresses:
            try:
                self.check_ip(ip)
            except UrlRefused as exc:
                reasons.append(str(exc))
                continue
            return ip
        # The addresses stay in the log: telling a tenant would make the guard a probe of internal DNS.
        log.warning("host %r of %s refused: %s", host, self._subject, "; ".join(reasons))
        raise UrlRefused(f"host {host!r} resolves only to non-public addresses; an operator can allow it "
                         f"with {self._setting}")

    def _name_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        for name in self._names:
            if name.startswith("*."):
                if host.endswith(name[1:]):
                    return True
            elif host == name:
                return True
        return False


def pinned_request(
    client: httpx.AsyncClient, method: str, target: Target, *, content: bytes, headers: dict[str, str]
) -> httpx.Request:
    """A request to ``target``'s checked IP that still names the original host (Host, SNI)."""
    return client.build_request(
        method, target.request_url, content=content, headers={**headers, "Host": target.host_header},
        extensions=target.extensions,
    )


async def _lookup(url: httpx.URL) -> list[IPAddress]:
    name = url.raw_host.decode("ascii")  # IDNA-encoded: what DNS is asked
    port = url.port or _DEFAULT_PORTS[url.scheme]
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(name, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UrlRefused(f"host {url.host!r} does not resolve ({exc})") from None
    # Drop IPv6 zone ids ("fe80::1%eth0"): the address is what is checked and connected to.
    addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
    if not addresses:
        raise UrlRefused(f"host {url.host!r} does not resolve")
    return addresses


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_localhost(host: str) -> bool:
    # RFC 6761: "localhost" and its subdomains always mean loopback, whatever DNS says.
    host = host.lower().rstrip(".")
    return host == "localhost" or host.endswith(".localhost")
