"""Who the caller is: the direct peer, or the client a trusted proxy names; optionally only its network."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from supportlens.config import Settings
from supportlens.errors import UserError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_ip(text: str | None) -> IPAddress | None:
    """An address from a peer or an X-Forwarded-For hop (``1.2.3.4:80`` and ``[::1]:80`` too), else None."""
    if not text:
        return None
    text = text.strip()
    if text.startswith("["):  # [v6]:port
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:  # v4:port
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # a dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d
    return address


def anonymize_ip(ip: str) -> str:
    """The network of an address: /24 of IPv4 (``203.0.113.7`` → ``203.0.113.0``), /48 of IPv6.

    Anything that is not an address becomes ``""``: an unreadable value is never kept in full.
    """
    address = parse_ip(ip)
    if address is None:
        return ""
    prefix = 24 if address.version == 4 else 48
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False).network_address)


@dataclass(frozen=True)
class ClientAddressPolicy:
    """Who the client is: the direct peer, or what a trusted proxy says in X-Forwarded-For."""

    trusted_proxies: tuple[IPNetwork, ...] = ()
    anonymize: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> ClientAddressPolicy:
        """Raises :class:`UserError` naming an entry of ``trusted_proxies`` that is not a network."""
        networks = []
        for entry in settings.trusted_proxies:
            try:
                networks.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError:
                raise UserError(
                    f"trusted_proxies: {entry!r} is not an IP network",
                    hint='use CIDRs, e.g. SUPPORTLENS_TRUSTED_PROXIES=\'["10.0.0.0/8", "192.0.2.7"]\'',
                ) from None
        return cls(tuple(networks), settings.anonymize_client_ips)

    def client_ip(self, peer: str | None, forwarded_for: Sequence[str] = ()) -> str:
        """The client's address as stored (anonymized when configured); ``""`` when there is none.

        X-Forwarded-For is read right to left, only while each hop is a trusted proxy: the
        first untrusted hop is the client. Anything a client wrote further left is ignored,
        so a client cannot choose its own address by sending the header itself.
        """
        return self.scrub(str(self._resolve(peer, forwarded_for) or ""))

    def scrub(self, ip: str) -> str:
        """An address as it may be stored: as is, or only its network when anonymizing."""
        return anonymize_ip(ip) if self.anonymize and ip else ip

    def _resolve(self, peer: str | None, forwarded_for: Sequence[str]) -> IPAddress | None:
        client = parse_ip(peer)
        if client is None or not forwarded_for or not self._trusted(client):
            return client
        hops = [hop for header in forwarded_for for hop in header.split(",") if hop.strip()]
        for hop in reversed(hops):
            address = parse_ip(hop)
            if address is None:
                break  # an unreadable hop: believe nothing to its left
            client = address
            if not self._trusted(address):
                break
        return client

    def _trusted(self, address: IPAddress) -> bool:
        return any(address in network for network in self.trusted_proxies)
