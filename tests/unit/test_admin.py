"""Admin browser sessions (dais_core.admin)."""

from __future__ import annotations

import attrs
import pytest

from dais_core.admin import (
    AdminToken,
    Role,
    authenticate_session,
    open_session,
)
from dais_core.errors import Unauthenticated
from dais_core.keys import ADMIN_PREFIX, SESSION_PREFIX, new_key
from dais_core.testing import MemoryAdminStore

HOUR = 3600.0


@pytest.fixture
def admins() -> MemoryAdminStore:
    return MemoryAdminStore()


def logged_in(admins: MemoryAdminStore, now: float = 100.0) -> tuple[AdminToken, str]:
    """Store a project admin and a session of theirs; return it and its token."""
    made = new_key(prefix=ADMIN_PREFIX)
    admin = AdminToken(made.id, made.secret_hash, Role.PROJECT, "p1", "lead", 1.0)
    admins.admins[admin.id] = admin
    opened = new_key(prefix=SESSION_PREFIX)
    session = open_session(admin, opened, now, HOUR)
    admins.sessions[session.id] = session
    return admin, opened.token


class TestSessions:
    """A session stands for its admin until it ends, and never longer."""

    def test_a_session_names_its_admin_until_it_ends(self, admins):
        """Within its lifetime a session authenticates as the admin who opened it."""
        admin, token = logged_in(admins)
        session, found = authenticate_session(admins, token, 100.0 + HOUR - 1)
        assert found == admin
        assert (session.created, session.expires) == (100.0, 100.0 + HOUR)

    def test_an_ended_session_is_refused(self, admins):
        """At its end time the session stops working."""
        _, token = logged_in(admins)
        with pytest.raises(Unauthenticated, match="ended"):
            authenticate_session(admins, token, 100.0 + HOUR)

    def test_a_revoked_admin_ends_the_session(self, admins):
        """Revoking the admin token ends every session opened with it."""
        admin, token = logged_in(admins)
        admins.admins[admin.id] = AdminToken(
            admin.id, admin.secret_hash, admin.role, "p1", "lead", 1.0, revoked=150.0
        )
        authenticate_session(admins, token, 149.0)
        with pytest.raises(Unauthenticated, match="revoked"):
            authenticate_session(admins, token, 150.0)

    def test_a_forgotten_session_is_refused(self, admins):
        """After logout (the stored session gone) its token opens nothing."""
        _, token = logged_in(admins)
        admins.sessions.clear()
        with pytest.raises(Unauthenticated, match="not known"):
            authenticate_session(admins, token, 101.0)

    def test_a_wrong_secret_is_refused(self, admins):
        """A token with the session's id but another secret is refused."""
        _, token = logged_in(admins)
        stored = next(iter(admins.sessions.values()))
        other = new_key(prefix=SESSION_PREFIX).secret_hash
        admins.sessions[stored.id] = attrs.evolve(stored, secret_hash=other)
        with pytest.raises(Unauthenticated, match="not known"):
            authenticate_session(admins, token, 101.0)

    @pytest.mark.parametrize("presented", ["", None, "daisadm_token", "x" * 80])
    def test_anything_but_a_session_token_is_refused(self, admins, presented):
        """An admin token, garbage or nothing is no session."""
        logged_in(admins)
        with pytest.raises(Unauthenticated):
            authenticate_session(admins, presented, 101.0)

    def test_an_admin_token_is_no_session(self, admins):
        """The admin token itself, put in the cookie, is refused."""
        made = new_key(prefix=ADMIN_PREFIX)
        admins.admins[made.id] = AdminToken(
            made.id, made.secret_hash, Role.PLATFORM, None, "ops", 1.0
        )
        with pytest.raises(Unauthenticated, match="malformed"):
            authenticate_session(admins, made.token, 101.0)
