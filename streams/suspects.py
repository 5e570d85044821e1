"""Which recent changes could explain an incident (pure).

Most outages follow a change. When an incident is declared or updated, the incident
manager ranks the changes (``Change`` records from the ``changes`` topic) that touch what
fails and started within ``window_s`` before its first surge:

- the failing service itself (a surging ``service`` value, the hop whose own spans fail)
  — the strongest evidence; the root service's change ranks above another failing hop's;
- the surging app version (a client release whose ``version`` is the ``app_version``
  that surges, on the surging platform if the change names one);
- the affected region, for a change that names no failing service or version (an
  infrastructure or network change in ``cn-east`` while ``cn-east`` fails).

A change that names a region other than the one the incident is about, or a platform
other than the surging one, cannot explain it and is left out, as is one that touches
nothing the incident names. Nearer is likelier: the score falls linearly from the
evidence's weight at the surge's start to half of it ``window_s`` before. Changes a little
after the start still count (``skew_s``): a CI clock and our event time differ by seconds,
and a rollout is often posted once it is under way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import msgspec

from supportlens.contracts import Change, IncidentEvent, Suspect

SKEW_S = 60
WEIGHT_ROOT_SERVICE = 1.0
WEIGHT_APP_VERSION = 1.0
WEIGHT_FAILING_SERVICE = 0.8
WEIGHT_REGION = 0.4
VERBS = {"deploy": "deployed", "config": "configuration changed", "feature_flag": "feature flag changed",
         "infra": "infrastructure changed"}


class SuspectRules(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    window_s: int = 3600
    top: int = 3


def rank(incident: IncidentEvent, changes: Iterable[Change], rules: SuspectRules) -> list[Suspect]:
    """The ``rules.top`` changes likeliest to explain ``incident``, likeliest first; empty when none fits."""
    found = [s for s in (_suspect(incident, c, rules) for c in changes) if s is not None]
    found.sort(key=lambda s: (-s.score, -s.started_at_us, s.change_id))
    return found[:rules.top]


def _suspect(incident: IncidentEvent, change: Change, rules: SuspectRules) -> Suspect | None:
    if change.drill != incident.drill:
        return None
    before_s = (incident.started_at_us - change.started_at_us) / 1e6
    if not -SKEW_S <= before_s <= rules.window_s:
        return None
    dims = incident.dimensions
    if change.region and dims.get("region", change.region) != change.region:
        return None
    if change.platform and dims.get("platform", change.platform) != change.platform:
        return None
    root = incident.root_key.split("=", 1)
    what = f"{change.service} {change.version}".strip()
    verb = VERBS[change.kind]
    if root == ["service", change.service]:
        weight, where = WEIGHT_ROOT_SERVICE, "in the failing hop"
    elif change.version and dims.get("app_version") == change.version:
        weight, where = WEIGHT_APP_VERSION, "the surging app version"
    elif change.service in incident.services:
        weight, where = WEIGHT_FAILING_SERVICE, "in a failing hop"
    elif change.region and dims.get("region") == change.region:
        weight, where = WEIGHT_REGION, f"in the affected region {change.region}"
    else:
        return None
    nearness = 1.0 - 0.5 * max(0.0, before_s) / rules.window_s
    return Suspect(change_id=change.change_id, kind=change.kind, service=change.service, version=change.version,
                   started_at_us=change.started_at_us, score=round(weight * nearness, 3),
                   reason=f"{what} {verb} {_ago(before_s)}, {where}")


def _ago(before_s: float) -> str:
    if before_s < 0:
        return f"{_span(-before_s)} after the surge began"
    return f"{_span(before_s)} before the surge"


def _span(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def keep(changes: dict[str, Change], since_us: Callable[[bool], int], limit: int = 10_000) -> dict[str, Change]:
    """The changes that may still explain an incident: started at or after ``since_us(drill)``
    (real traffic and drills each have their own time), the newest ``limit`` of them."""
    kept = sorted((c for c in changes.values() if c.started_at_us >= since_us(c.drill)),
                  key=lambda c: (c.started_at_us, c.change_id))
    return {c.change_id: c for c in kept[-limit:]}
