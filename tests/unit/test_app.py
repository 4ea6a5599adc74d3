"""The daemon's verdict on a failed task: refused credentials keep it up (unready), however the
task that met them wrapped the error."""

from __future__ import annotations

from syncd.app import refused_credentials
from syncd.errors import AuthError


def test_refused_credentials_are_found_inside_a_task_groups_exception_group() -> None:
    auth = AuthError("LwA token request failed (HTTP 400): invalid_grant")
    assert refused_credentials(auth) is auth
    # a sender's workers meeting the refused token at once: its TaskGroup raises a group
    group = ExceptionGroup("unhandled errors in a TaskGroup", [auth, AuthError("again")])
    assert refused_credentials(group) is auth
    nested = ExceptionGroup("outer", [ExceptionGroup("inner", [auth])])
    assert refused_credentials(nested) is auth
    # anything else in the group is a failure of its own: the daemon exits for a restart
    mixed = ExceptionGroup("unhandled errors in a TaskGroup", [auth, RuntimeError("bug")])
    assert refused_credentials(mixed) is None
    assert refused_credentials(RuntimeError("bug")) is None
    assert refused_credentials(None) is None
