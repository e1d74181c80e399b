"""A login page for the Locust web UI when it runs with ``--web-login``.

Locust's ``--web-login`` only turns the login requirement on; the locustfile
must say who may log in. Here that is one account from the environment:
``LLMSLO_LOCUST_USER`` (default ``admin``) and ``LLMSLO_LOCUST_PASSWORD``
(required: without it the master refuses to start rather than run open).
The compose file always passes ``--web-login``, so the UI stays closed even when
``LLMSLO_BIND=0.0.0.0`` publishes it. ``/metrics`` (Prometheus' target) stays
open; every page and API of Locust's own UI needs the login.

Locust loads every module of ``loadtest/`` not starting with ``_``; this one
defines no users, only the init hook.
"""

from __future__ import annotations

import hmac
import os
import secrets

from flask import Blueprint, redirect, request, session, url_for
from flask_login import UserMixin, login_user
from locust import events
from locust.env import Environment

USER_ENV = "LLMSLO_LOCUST_USER"
PASSWORD_ENV = "LLMSLO_LOCUST_PASSWORD"


class Operator(UserMixin):
    """The one account of the UI (flask-login wants an object with an id)."""

    def __init__(self, name: str) -> None:
        self.id = name


def credentials_ok(username: str, password: str, expected_user: str, expected_password: str) -> bool:
    """Constant-time comparison of both fields, so a wrong guess leaks nothing through timing."""
    user_ok = hmac.compare_digest(username.encode(), expected_user.encode())
    password_ok = hmac.compare_digest(password.encode(), expected_password.encode())
    return user_ok and password_ok


@events.init.add_listener
def _install_login(environment: Environment, **_kwargs: object) -> None:
    if environment.web_ui is None or not environment.parsed_options.web_login:
        return
    expected_user = os.environ.get(USER_ENV) or "admin"
    expected_password = os.environ.get(PASSWORD_ENV, "")
    if not expected_password:
        raise SystemExit(f"--web-login needs the UI password in ${PASSWORD_ENV} (and optionally ${USER_ENV})")
    web_ui = environment.web_ui
    base = environment.parsed_options.web_base_path or ""
    web_ui.app.config["SECRET_KEY"] = secrets.token_hex(32)  # sessions end when the master restarts
    web_ui.login_manager.user_loader(lambda name: Operator(name) if name == expected_user else None)
    web_ui.auth_args = {"username_password_callback": f"{base}/login_submit"}
    blueprint = Blueprint("llmslo_login", __name__, url_prefix=base)

    @blueprint.route("/login_submit", methods=["POST"])
    def login_submit():  # type: ignore[no-untyped-def]
        username = request.form.get("username", "")
        if credentials_ok(username, request.form.get("password", ""), expected_user, expected_password):
            login_user(Operator(username))
            return redirect(url_for("locust.index"))
        session["auth_error"] = "Invalid username or password"
        return redirect(url_for("locust.login"))

    web_ui.app.register_blueprint(blueprint)
