"""How keys, records and admin actions are shown: JSON-ready dictionaries."""

from __future__ import annotations

import datetime
from typing import Any

from dais_core.admin import AuditRecord
from dais_core.values import Credential

__all__ = ["audit_json", "credential_json", "iso", "parse_iso"]


def iso(when: float | None) -> str | None:
    """Return an epoch time as ISO 8601 in UTC, or ``None``."""
    if when is None:
        return None
    try:
        moment = datetime.datetime.fromtimestamp(when, datetime.UTC)
    except (OverflowError, ValueError, OSError):
        # Stored before times were checked: show the number, never fail.
        return repr(when)
    return moment.isoformat(timespec="seconds")


def parse_iso(text: str) -> float:
    """Return the epoch time of an ISO 8601 date-time (UTC if no zone).

    Raises:
        ValueError: The text is not ISO 8601.
    """
    when = datetime.datetime.fromisoformat(text)
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def credential_json(credential: Credential, now: float) -> dict[str, Any]:
    """Return a key as shown to admins at ``now``: everything but the secret."""
    key = credential.key
    return {
        "id": key.id,
        "project": key.project,
        "state": key.state(now),
        "label": key.label,
        "requestor": key.request.requestor,
        "approver": key.request.approver,
        "app_ids": list(key.request.app_ids),
        "case_code": key.request.case_code,
        "lighthouse": key.request.lighthouse,
        "business_case": key.request.business_case,
        "created": iso(key.created),
        "expires": iso(key.expires),
        "revoked": iso(key.revoked),
        "last_used": iso(key.last_used),
        "permissions": [
            {
                "project": p.project,
                "service": p.service,
                "prefix": p.prefix,
                "methods": sorted(p.methods),
            }
            for p in credential.permissions
        ],
        "grants": [
            {
                "resource": g.resource,
                "locations": list(g.locations),
                "type": g.data_type.value,
            }
            for g in credential.grants
        ],
    }


def audit_json(record: AuditRecord) -> dict[str, Any]:
    """Return one admin action as shown to platform admins."""
    return {
        "at": iso(record.at),
        "actor": record.actor,
        "action": record.action,
        "target": record.target,
        "detail": record.detail,
    }
