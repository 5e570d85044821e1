"""The simulated world: regions and ISPs, services and their owner teams, call chains, users and accounts.

Everything is built deterministically from a seed, so a run can be repeated exactly.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random
from dataclasses import dataclass

import msgspec

from supportlens.contracts import Account, Contact, Network


@dataclass(frozen=True)
class Isp:
    name: str
    asn: int
    prefix: str  # the /16 its customers' addresses come from


@dataclass(frozen=True)
class Region:
    name: str
    utc_offset_h: int
    locale: str
    isps: tuple[Isp, ...]


# Made-up address blocks, one /16 per ISP, so that an outage of one ISP shows as one
# network in the data while users still get distinct IPs.
REGIONS: tuple[Region, ...] = (
    Region("cn-north", 8, "zh-CN", (Isp("China Unicom", 4837, "198.18.0.0/16"), Isp("China Mobile", 9808, "198.19.0.0/16"))),
    Region("cn-east", 8, "zh-CN", (Isp("China Telecom", 4134, "203.0.0.0/16"), Isp("China Mobile", 9808, "203.1.0.0/16"))),
    Region("eu-west", 1, "en", (Isp("Deutsche Telekom", 3320, "192.0.0.0/16"), Isp("Orange", 3215, "192.1.0.0/16"))),
    Region("us-east", -5, "en", (Isp("Comcast", 7922, "198.51.0.0/16"), Isp("Verizon", 701, "198.52.0.0/16"))),
    Region("ap-southeast", 8, "en", (Isp("Singtel", 7473, "100.64.0.0/16"), Isp("StarHub", 4657, "100.65.0.0/16"))),
)
CONNECTION_TYPES = ("wifi", "wifi", "cellular-4g", "cellular-5g", "ethernet")
PLATFORMS = ("ios", "android", "web")
APP_VERSIONS = ("5.2.0", "5.3.0", "5.3.1")
BAD_RELEASE = "5.4.0"


@dataclass(frozen=True)
class Service:
    name: str
    team: str
    base_ms: float  # typical own processing time
    objective_ms: float  # latency objective of its own hop


SERVICES: dict[str, Service] = {
    s.name: s
    for s in (
        Service("edge-gateway", "sre", 3, 50),
        Service("auth", "identity", 12, 150),
        Service("catalog", "commerce", 25, 300),
        Service("search", "discovery", 40, 400),
        Service("orders", "commerce", 30, 400),
        Service("inventory", "commerce", 15, 200),
        Service("payment", "payments", 80, 800),
    )
}


@dataclass(frozen=True)
class Operation:
    """A client-visible API call and the chain of services behind it.

    ``chain`` lists (service, parent index); index 0 is the root (parent -1).
    """

    name: str
    screen: str
    weight: float
    chain: tuple[tuple[str, int], ...]

    def services(self) -> tuple[str, ...]:
        return tuple(service for service, _ in self.chain)


OPERATIONS: tuple[Operation, ...] = (
    Operation("GET /v1/catalog", "home", 0.40, (("edge-gateway", -1), ("catalog", 0), ("search", 1))),
    Operation("POST /v1/login", "login", 0.10, (("edge-gateway", -1), ("auth", 0))),
    Operation("GET /v1/orders/{id}", "orders", 0.20, (("edge-gateway", -1), ("auth", 0), ("orders", 0))),
    Operation(
        "POST /v1/orders",
        "checkout",
        0.20,
        (("edge-gateway", -1), ("auth", 0), ("orders", 0), ("inventory", 2), ("payment", 2)),
    ),
    Operation("POST /v1/payments/confirm", "checkout", 0.10, (("edge-gateway", -1), ("payment", 0))),
)
OPERATION_BY_NAME = {op.name: op for op in OPERATIONS}


@dataclass(frozen=True)
class User:
    user_id: str
    account_id: str
    region: Region
    isp: Isp
    connection_type: str
    client_ip: str
    platform: str
    app_version: str
    locale: str
    consented: bool

    @property
    def network(self) -> Network:
        return Network(isp=self.isp.name, asn=self.isp.asn, connection_type=self.connection_type)


@dataclass(frozen=True)
class World:
    users: tuple[User, ...]
    accounts: tuple[Account, ...]
    vip_accounts: frozenset[str]
    misuse_account: str  # the VIP integration that the misuse-wave scenario makes misbehave
    # the standard account whose integration reuses idempotency keys in every scenario ("": none has users)
    sequence_misuse_account: str = ""


def build_world(seed: int, users: int, vip_share: float = 0.1, consent_share: float = 0.9,
                bad_release_share: float = 0.3) -> World:
    """A deterministic population: ~20 users per account, ``vip_share`` of accounts VIP."""
    rng = random.Random(f"world:{seed}")
    n_accounts = max(2, users // 20)
    n_vip = max(1, round(n_accounts * vip_share))
    accounts = []
    for i in range(n_accounts):
        account_id = f"acct-{i:05d}"
        vip = i < n_vip
        locale = "zh-CN" if i % 3 == 0 else "en"
        accounts.append(
            Account(
                account_id=account_id,
                name=f"Customer {i:05d}",
                tier="vip" if vip else "standard",
                locale=locale,
                channel="webhook" if vip and i % 2 == 0 else ("email" if vip else "none"),
                webhook_url=f"http://127.0.0.1:9/hooks/{account_id}" if vip and i % 2 == 0 else "",
                contacts=[Contact(name=f"Ops {i:05d}", email=f"ops-{i:05d}@example.com")] if vip else [],
            )
        )
    population = []
    for i in range(users):
        region = rng.choice(REGIONS)
        isp = rng.choice(region.isps)
        network = ipaddress.ip_network(isp.prefix)
        platform = rng.choice(PLATFORMS)
        version = BAD_RELEASE if platform == "android" and rng.random() < bad_release_share else rng.choice(APP_VERSIONS)
        population.append(
            User(
                user_id=f"user-{i:06d}",
                account_id=accounts[rng.randrange(n_accounts)].account_id,
                region=region,
                isp=isp,
                connection_type=rng.choice(CONNECTION_TYPES),
                client_ip=str(network[rng.randrange(1, network.num_addresses - 1)]),
                platform=platform,
                app_version=version,
                locale=region.locale,
                consented=rng.random() < consent_share,
            )
        )
    vip = frozenset(a.account_id for a in accounts if a.tier == "vip")
    return World(tuple(population), tuple(accounts), vip, misuse_account=accounts[0].account_id,
                 sequence_misuse_account=first_standard_account(accounts, population))


def first_standard_account(accounts: list[Account], users: list[User]) -> str:
    """The first standard (non-VIP) account with a user, "" if none has one. Chosen from the world
    as built, never by a draw: the world's generator, and so every world, stays as it was."""
    used = {u.account_id for u in users}
    return next((a.account_id for a in accounts if a.tier == "standard" and a.account_id in used), "")


def integration_user(world: World, account_id: str) -> User | None:
    """The account's integration: its first user in ``user_id`` order (None without users)."""
    return min((u for u in world.users if u.account_id == account_id), key=lambda u: u.user_id, default=None)


def with_vip_webhooks(world: World, base_url: str) -> World:
    """The same world, every VIP account taking its notices by webhook at ``<base_url>/<account id>``
    (the demo's receiver stands in for the customers' endpoints)."""
    accounts = tuple(msgspec.structs.replace(a, channel="webhook", webhook_url=f"{base_url.rstrip('/')}/{a.account_id}")
                     if a.tier == "vip" else a for a in world.accounts)
    return dataclasses.replace(world, accounts=accounts)
