"""The problem catalog (``problem_catalog.toml``): codes → class, owners, user-language texts.

Loaded once, validated strictly, then read-only. A catalog that does not validate
stops the worker at start with the path of the problem, never mid-stream.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

import msgspec

from supportlens.contracts import CLASSES, DiagnosisClass
from supportlens.errors import UserError

DEFAULT_PATH = Path(__file__).with_name("problem_catalog.toml")
Lang = Literal["en", "zh-CN"]


class Wording(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    title: str
    explanation: str
    action: str


class ClassEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True, rename={"zh_cn": "zh-CN"}):
    en: Wording
    zh_cn: Wording
    doc: str = ""


class CodeEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True, rename={"cls": "class", "zh_cn": "zh-CN"}):
    cls: DiagnosisClass
    doc: str = ""
    en: Wording | None = None
    zh_cn: Wording | None = None


class ServiceEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    team: str
    objective_ms: float
    label: dict[str, str]


class Thresholds(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    network_slow_ms: float = 2000
    network_slow_ratio: float = 1.0
    server_time_objective_ms: float = 1500


SequenceKind = Literal["reused_key", "missing_precursor", "too_frequent"]


class SequenceRule(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A misuse seen only in a sequence of one user's requests and behaviour (``streams.sequences``).

    ``reused_key``: ``operation`` sent with the ``key`` attribute of an earlier one (within
    ``window_s``) but another ``value`` attribute. ``missing_precursor``: ``operation`` with no
    ``precursor`` (an operation or a behaviour event) before it in the same session (``scope``
    "session") or at all within ``window_s`` (``scope`` "user"). ``too_frequent``: ``count``
    calls of ``operation`` in a row, each less than ``min_interval_s`` after the one before.

    A later failure of the same user counts as the misuse when it comes within
    ``surfaces_within_s`` of it, looks like one of ``surfaces_as`` and, if ``surfaces_in`` names
    services, failed in one of them.
    """

    code: str  # the catalog code it counts as: its wording and doc
    kind: SequenceKind
    operation: str
    surfaces_as: list[DiagnosisClass]
    surfaces_within_s: float = 3600
    surfaces_in: list[str] = []
    window_s: float = 3600
    key: str = ""
    value: str = ""
    precursor: str = ""
    scope: Literal["session", "user"] = "session"
    min_interval_s: float = 0
    count: int = 0
    grace_s: float = 5.0  # missing_precursor: how long a late precursor may still arrive


class Catalog(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    version: int
    docs_base: str
    thresholds: Thresholds
    services: dict[str, ServiceEntry]
    classes: dict[DiagnosisClass, ClassEntry]
    codes: dict[str, CodeEntry]
    sequences: dict[str, SequenceRule] = {}

    def team_of(self, service: str) -> str:
        entry = self.services.get(service)
        return entry.team if entry else "unowned"

    def label_of(self, service: str, locale: str) -> str:
        entry = self.services.get(service)
        if entry is None:
            return {"zh-CN": "后台"}.get(locale, "backend")
        return entry.label.get(locale) or entry.label.get("en") or service

    def wording(self, cls: DiagnosisClass, code: str, locale: str) -> tuple[Wording, str]:
        """The user-facing text and doc URL: the code's own when it has one, else its class's."""
        use_zh = locale == "zh-CN"
        entry = self.codes.get(code) if code else None
        if entry is not None and entry.cls == cls:
            text = (entry.zh_cn if use_zh else entry.en) or (entry.en if use_zh else None)
            if text is not None:
                return text, self.docs_base + (entry.doc or self.classes[cls].doc)
        cls_entry = self.classes[cls]
        return (cls_entry.zh_cn if use_zh else cls_entry.en), self.docs_base + cls_entry.doc


def load_catalog(path: Path = DEFAULT_PATH) -> Catalog:
    """Read and validate a catalog; every diagnosis class must have wording."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
        catalog = msgspec.convert(raw, Catalog)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"cannot read the problem catalog {path}: {exc}") from None
    except msgspec.ValidationError as exc:
        raise UserError(f"invalid problem catalog {path}: {exc}") from None
    missing = set(CLASSES) - set(catalog.classes)
    if missing:
        raise UserError(f"invalid problem catalog {path}: no wording for classes {sorted(missing)}")
    for name, rule in catalog.sequences.items():
        problem = sequence_problem(rule, catalog)
        if problem:
            raise UserError(f"invalid problem catalog {path}: sequence {name!r}: {problem}")
    return catalog


def sequence_problem(rule: SequenceRule, catalog: Catalog) -> str:
    """What makes a sequence rule unusable, or "" (pure)."""
    entry = catalog.codes.get(rule.code)
    if entry is None or entry.cls != "client_misuse":
        return f"code {rule.code!r} is not a catalogued client_misuse code"
    needs = {"reused_key": ("key", "value"), "missing_precursor": ("precursor",),
             "too_frequent": ("min_interval_s", "count")}[rule.kind]
    unset = [field for field in needs if not getattr(rule, field)]
    if unset:
        return f"a {rule.kind} rule needs {' and '.join(unset)}"
    if rule.kind == "too_frequent" and rule.count < 2:
        return "count must be at least 2"
    if not rule.surfaces_as:
        return "surfaces_as must name at least one diagnosis class"
    return ""
