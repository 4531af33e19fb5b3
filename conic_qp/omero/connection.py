"""The one place conic-qp touches omero-py and Ice: imports, credentials, sessions, errors, logs.

Like paquo's ``java.py`` fences the JVM, this module fences OMERO: every other module gets the
omero-py namespaces through :func:`omero_api` (which turns a missing install into one clear
line), connects through :class:`OmeroConnection`, and wraps server calls in
:func:`omero_errors`, which turns any Ice / OMERO exception into a :class:`ConicQPError`
(:class:`OmeroConnectionLost` when the connection dropped, so a job can retry).

Credentials, in this order (the first that applies wins):

1. a session key: ``--session-key`` or ``OMERO_SESSION_KEY``, joined on ``--host`` /
   ``OMERO_HOST`` / the reference's host / the ``omero login`` host;
2. a user name and password from ``OMERO_USER`` and ``OMERO_PASSWORD`` (never a command-line
   option: those are visible to every user of the machine in ``ps``);
3. the current ``omero login`` session (``omero.util.sessions.SessionsStore``:
   ``get_current()`` -> host, user, key, port; the folder is ``OMERO_SESSIONDIR`` or
   ``~/omero/sessions``), used when its host matches.

``OMERO_HOST``, ``OMERO_PORT`` (default 4064) and ``OMERO_GROUP`` complete them. Passwords and
session keys never appear in messages, logs, run.json or tables: they are held in fields excluded
from ``repr``, scrubbed from every error text, and omero-py's own loggers (which log the session
uuid at INFO: ``BlitzGateway.connect`` "created connection (uuid=...)") are held at WARNING and
redacted while a connection is open.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from conic_qp.errors import ConicQPError, option

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_PORT",
    "ENV_GROUP",
    "ENV_HOST",
    "ENV_PASSWORD",
    "ENV_PORT",
    "ENV_SESSION_KEY",
    "ENV_USER",
    "OmeroConnection",
    "OmeroConnectionLost",
    "OmeroCredentials",
    "omero_api",
    "omero_errors",
    "resolve_credentials",
    "translate_error",
]

DEFAULT_PORT = 4064  # omero.constants.GLACIER2PORT
ENV_HOST = "OMERO_HOST"
ENV_PORT = "OMERO_PORT"
ENV_USER = "OMERO_USER"
ENV_PASSWORD = "OMERO_PASSWORD"
ENV_SESSION_KEY = "OMERO_SESSION_KEY"
ENV_GROUP = "OMERO_GROUP"
ENV_SESSION_DIR = (
    "OMERO_SESSIONDIR"  # what `omero login` itself honours (omero/plugins/sessions.py)
)

INSTALL_HINT = (
    "OMERO support needs omero-py and zeroc-ice 3.6: pip install 'conic-qp[omero]' (on Linux "
    "first install a zeroc-ice 3.6.5 wheel; see docs/omero.md)"
)

#: omero-py loggers held at WARNING: omero.gateway logs session uuids at INFO/DEBUG.
_OMERO_LOGGERS = ("omero", "omero.gateway", "omero.client", "omero.util", "omero.tables")


class OmeroConnectionLost(ConicQPError):
    """The connection to the server dropped (or timed out); the work can be retried."""

    #: :func:`conic_qp.cohort.run_slide_job` marks the slide's failure as retryable
    retryable = True


# ------------------------------------------------------------------------------------ imports

_API: SimpleNamespace | None = None
_API_LOCK = threading.Lock()


def omero_api() -> SimpleNamespace:
    """omero-py's namespaces: ``Ice``, ``Glacier2``, ``omero``, ``model``, ``grid``, ``rtypes``,
    ``sys``, ``gateway``, ``BlitzGateway``, ``SessionsStore``.

    Raises
    ------
    ConicQPError
        omero-py or Ice is not installed (with the install hint).
    """
    global _API
    with _API_LOCK:
        if _API is not None:
            return _API
        try:
            import Glacier2
            import Ice
            import omero
            import omero.clients  # registers the model object factories
            import omero.gateway
            import omero.grid
            import omero.model
            import omero.rtypes
            import omero.sys
            from omero.util.sessions import SessionsStore
        except ImportError as exc:
            raise ConicQPError(f"{INSTALL_HINT} ({exc})") from None
        _hold_omero_loggers()
        _API = SimpleNamespace(
            Ice=Ice,
            Glacier2=Glacier2,
            omero=omero,
            model=omero.model,
            grid=omero.grid,
            rtypes=omero.rtypes,
            sys=omero.sys,
            gateway=omero.gateway,
            BlitzGateway=omero.gateway.BlitzGateway,
            SessionsStore=SessionsStore,
        )
        return _API


def _hold_omero_loggers() -> None:
    for name in _OMERO_LOGGERS:
        lg = logging.getLogger(name)
        if lg.level == logging.NOTSET or lg.level < logging.WARNING:
            lg.setLevel(logging.WARNING)


# -------------------------------------------------------------------------------- credentials


@dataclass(frozen=True)
class OmeroCredentials:
    """Where and how to log in. Secrets are excluded from ``repr`` and ``str``."""

    host: str
    port: int = DEFAULT_PORT
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    session_key: str | None = field(default=None, repr=False)
    group: str | None = None
    source: str = ""

    @property
    def server(self) -> str:
        """``host:port``, for messages and records."""
        return f"{self.host}:{self.port}"

    @property
    def secrets(self) -> tuple[str, ...]:
        """Strings that must never be shown (password, session key)."""
        return tuple(s for s in (self.password, self.session_key) if s)

    def __str__(self) -> str:
        who = self.user or "session"
        return f"{who}@{self.server} ({self.source})"


def _session_dir(environ: Mapping[str, str], session_dir: str | os.PathLike[str] | None) -> Path:
    if session_dir is not None:
        return Path(session_dir)
    if environ.get(ENV_SESSION_DIR):
        return Path(environ[ENV_SESSION_DIR])
    userdir = environ.get("OMERO_USERDIR")
    return (Path(userdir) if userdir else Path.home() / "omero") / "sessions"


def _parse_port(text: str | int | None, where: str) -> int | None:
    if text is None or text == "":
        return None
    try:
        port = int(text)
    except (TypeError, ValueError):
        raise ConicQPError(
            f"{where} {text!r} is not a port number (the Blitz port is usually 4064)"
        ) from None
    if not 0 < port < 65536:
        raise ConicQPError(f"{where} {port} is not a valid port (1-65535; usually 4064)")
    return port


def _login_session(directory: Path) -> tuple[str, str, str, int | None] | None:
    """``(host, user, key, port)`` of the current ``omero login`` session, if there is one."""
    if not directory.is_dir():  # SessionsStore would create it
        return None
    store = omero_api().SessionsStore(str(directory))
    host, user, key, port = store.get_current()
    if not (host and user and key):
        return None
    return str(host), str(user), str(key), _parse_port(port, "the omero login port")


def resolve_credentials(
    host: str | None = None,
    port: int | None = None,
    session_key: str | None = None,
    group: str | None = None,
    *,
    ref_host: str | None = None,
    ref_port: int | None = None,
    environ: Mapping[str, str] | None = None,
    session_dir: str | os.PathLike[str] | None = None,
) -> OmeroCredentials:
    """Credentials from (in order) a session key, ``OMERO_USER``/``OMERO_PASSWORD``, or the
    current ``omero login`` session; see the module docstring.

    Parameters
    ----------
    host, port, session_key, group : explicit values (CLI options); they win over the
        environment.
    ref_host, ref_port : server named by the image reference (``omero://host/...``), used when
        neither an option nor the environment names one.
    environ : environment (default ``os.environ``).
    session_dir : ``omero login`` session folder (default ``OMERO_SESSIONDIR`` or
        ``~/omero/sessions``).

    Raises
    ------
    ConicQPError
        No usable login, an incomplete one, or a bad port.
    """
    env = os.environ if environ is None else environ
    if port is not None:
        port = _parse_port(port, option("port"))
    host = host or env.get(ENV_HOST) or ref_host or None
    port = (
        port
        if port is not None
        else _parse_port(env.get(ENV_PORT), ENV_PORT) or (ref_port if host == ref_host else None)
    )
    group = group or env.get(ENV_GROUP) or None
    key = session_key or env.get(ENV_SESSION_KEY) or None
    user, password = env.get(ENV_USER) or None, env.get(ENV_PASSWORD) or None
    login = None
    if key is None and not (user and password):
        login = _login_session(_session_dir(env, session_dir))
    if key is not None:
        if host is None and login is None:
            login = _login_session(_session_dir(env, session_dir))
        if host is None and login is not None:
            host, port = login[0], port or login[3]
        if host is None:
            raise ConicQPError(
                f"a session key needs a server: pass {option('host')} or set {ENV_HOST}"
            )
        return OmeroCredentials(host, port or DEFAULT_PORT, None, None, key, group, "session key")
    if user or password:
        if not (user and password):
            missing = ENV_PASSWORD if user else ENV_USER
            raise ConicQPError(
                f"{ENV_USER if user else ENV_PASSWORD} is set but {missing} is not; set both, "
                "or use `omero login`"
            )
        if host is None:
            raise ConicQPError(
                f"{ENV_USER} is set but no server: pass {option('host')} or set {ENV_HOST}"
            )
        return OmeroCredentials(
            host, port or DEFAULT_PORT, user, password, None, group, "environment"
        )
    if login is not None:
        l_host, l_user, l_key, l_port = login
        if host is None or _same_host(host, l_host):
            return OmeroCredentials(
                l_host,
                port or l_port or DEFAULT_PORT,
                l_user,
                None,
                l_key,
                group,
                "omero login session",
            )
        raise ConicQPError(
            f"the current `omero login` session is on {l_host}, not {host}; run "
            f"`omero login {host}` (or set {ENV_USER}/{ENV_PASSWORD})"
        )
    where = f" {host}" if host else " HOST"
    raise ConicQPError(
        f"no OMERO login found: run `omero login{where}`, set {ENV_USER} and {ENV_PASSWORD} "
        f"(with {ENV_HOST}), or pass {option('session_key')}"
    )


def _same_host(a: str, b: str) -> bool:
    return a.strip().lower().rstrip("/") == b.strip().lower().rstrip("/")


# ------------------------------------------------------------------------------------- errors


def scrub(text: str, secrets: Sequence[str]) -> str:
    """``text`` with every secret replaced by ``***``."""
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


def _server_message(exc: BaseException) -> str:
    msg = getattr(exc, "message", None) or getattr(exc, "reason", None) or ""
    msg = str(msg).strip()
    return msg.splitlines()[0][:200] if msg else ""


def translate_error(
    exc: BaseException, what: str, server: str = "the server", secrets: Sequence[str] = ()
) -> ConicQPError:
    """One :class:`ConicQPError` line for an Ice / OMERO exception raised while doing ``what``."""
    api = omero_api()
    Ice, Glacier2, omero = api.Ice, api.Glacier2, api.omero
    reason = scrub(_server_message(exc), secrets)
    detail = f" ({reason})" if reason else ""
    if isinstance(exc, ConicQPError):
        return exc
    if isinstance(exc, Ice.ConnectionRefusedException):
        return ConicQPError(
            f"cannot connect to OMERO at {server}: connection refused; check the host and the "
            "Blitz port (usually 4064) and that the server is running"
        )
    if isinstance(exc, Ice.DNSException):
        return ConicQPError(f"cannot connect to OMERO at {server}: unknown host name")
    if isinstance(exc, Ice.ConnectTimeoutException | Ice.ConnectFailedException):
        return ConicQPError(
            f"cannot connect to OMERO at {server} ({type(exc).__name__}); check the host, port "
            "and firewall"
        )
    if isinstance(
        exc,
        Ice.ConnectionLostException
        | Ice.TimeoutException
        | Ice.CloseConnectionException
        | Ice.CommunicatorDestroyedException
        | Ice.SocketException,
    ):
        return OmeroConnectionLost(
            f"the connection to OMERO at {server} was lost while {what} ({type(exc).__name__})"
        )
    if isinstance(exc, Glacier2.PermissionDeniedException):
        return ConicQPError(
            f"OMERO at {server} refused the login{detail}: wrong user name or password, or the "
            "account is disabled"
        )
    if isinstance(exc, Glacier2.CannotCreateSessionException):
        return ConicQPError(f"OMERO at {server} could not create a session{detail}")
    if isinstance(exc, omero.RemovedSessionException | omero.SessionTimeoutException):
        return ConicQPError(
            f"the OMERO session on {server} has expired or was closed; run `omero login` again"
        )
    if isinstance(exc, Ice.ObjectNotExistException):
        return OmeroConnectionLost(
            f"the OMERO session on {server} ended while {what}; log in again"
        )
    if isinstance(exc, omero.SecurityViolation):
        return ConicQPError(
            f"no permission for {what} on OMERO at {server}{detail}; check the group "
            f"({option('group')}) "
            "and your rights on the data"
        )
    if isinstance(exc, omero.MissingPyramidException):
        return ConicQPError(
            f"OMERO at {server} is still building the pyramid for {what}; try again later"
        )
    if isinstance(exc, omero.ValidationException | omero.ApiUsageException):
        return ConicQPError(f"OMERO at {server} rejected {what}{detail}")
    if isinstance(exc, omero.ServerError):
        return ConicQPError(f"OMERO server error while {what} ({type(exc).__name__}){detail}")
    if isinstance(exc, omero.ClientError):
        return ConicQPError(f"OMERO client error while {what}{detail}")
    if isinstance(exc, Ice.Exception):
        return ConicQPError(f"OMERO/Ice error while {what} ({type(exc).__name__}){detail}")
    raise TypeError(f"not an OMERO/Ice exception: {type(exc).__name__}")


def is_omero_exception(exc: BaseException) -> bool:
    api = omero_api()
    return isinstance(exc, api.Ice.Exception | api.omero.ClientError)


@contextlib.contextmanager
def omero_errors(
    what: str, server: str = "the server", secrets: Sequence[str] = ()
) -> Iterator[None]:
    """Turn Ice / OMERO exceptions raised in the block into :class:`ConicQPError`."""
    try:
        yield
    except ConicQPError:
        raise
    except Exception as exc:
        if not is_omero_exception(exc):
            raise
        raise translate_error(exc, what, server, secrets) from exc


# ------------------------------------------------------------------------------------ logging


class _Redactor(logging.Filter):
    """Replaces secrets in every record that reaches a handler."""

    def __init__(self, secrets: Sequence[str]) -> None:
        super().__init__("conic_qp.omero.redact")
        self.secrets = tuple(s for s in secrets if s)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a malformed record: leave it to the handler
            return True
        clean = scrub(text, self.secrets)
        if clean != text:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_text = scrub(exc_text, self.secrets)
        return True


def _all_handlers() -> list[logging.Handler]:
    handlers = list(logging.getLogger().handlers)
    for name in ("conic_qp", *_OMERO_LOGGERS):
        handlers.extend(logging.getLogger(name).handlers)
    return handlers


@contextlib.contextmanager
def redact_secrets(secrets: Sequence[str]) -> Iterator[None]:
    """While the block runs, scrub ``secrets`` from every log record reaching a handler."""
    if not any(secrets):
        yield
        return
    redactor = _Redactor(secrets)
    handlers = _all_handlers()
    for h in handlers:
        h.addFilter(redactor)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(redactor)


# --------------------------------------------------------------------------------- connection


class OmeroConnection:
    """A logged-in BlitzGateway with clear errors, reconnection and secret-safe logging.

    Use as a context manager. A joined session (``omero login``, a session key) is only
    detached on close, so the user's session survives; a session created from a password is
    closed.

    Parameters
    ----------
    credentials : from :func:`resolve_credentials`.
    keep_alive : seconds between keep-alive pings while connected (a long slide keeps its
        session); 0 disables them.
    """

    def __init__(self, credentials: OmeroCredentials, *, keep_alive: int = 60) -> None:
        self.credentials = credentials
        self.keep_alive = keep_alive
        self._gateway: Any = None
        self._owned = True
        self._redact: contextlib.ExitStack | None = None
        self.group_id: int | None = None

    @classmethod
    def from_gateway(cls, gateway: Any, server: str = "the server") -> OmeroConnection:
        """Wrap a connection made elsewhere (an OMERO.script's); closing it is the owner's job."""
        host, _, port = server.partition(":")
        creds = OmeroCredentials(
            host or "server", int(port) if port.isdigit() else DEFAULT_PORT, source="script"
        )
        conn = cls(creds, keep_alive=0)
        conn._gateway = gateway
        conn._owned = False
        return conn

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def server(self) -> str:
        return self.credentials.server

    @property
    def secrets(self) -> tuple[str, ...]:
        return self.credentials.secrets

    @property
    def gateway(self) -> Any:
        """The connected ``omero.gateway.BlitzGateway`` (connects on first use)."""
        if self._gateway is None:
            self.connect()
        return self._gateway

    def connect(self) -> Any:
        """Log in; returns the BlitzGateway. Every failure is one :class:`ConicQPError` line."""
        api = omero_api()
        c = self.credentials
        if self._redact is None:
            self._redact = contextlib.ExitStack()
            self._redact.enter_context(redact_secrets(c.secrets))
        what = "logging in"
        gw = None
        try:
            with omero_errors(what, c.server, c.secrets):
                if c.session_key:
                    gw = api.BlitzGateway(host=c.host, port=c.port)
                    ok = gw.connect(sUuid=c.session_key)
                else:
                    gw = api.BlitzGateway(c.user, c.password, host=c.host, port=c.port)
                    ok = gw.connect()
                if not ok:
                    err = gw.getLastError()
                    if err is not None and is_omero_exception(err):
                        raise translate_error(err, what, c.server, c.secrets)
                    if c.session_key:
                        raise ConicQPError(
                            f"OMERO at {c.server} did not accept the session key ({c.source}): "
                            "it expired or was closed; run `omero login` again or pass a "
                            "current key"
                        )
                    raise ConicQPError(f"OMERO at {c.server} refused the login of {c.user!r}")
                if self.keep_alive > 0:
                    gw.c.enableKeepAlive(int(self.keep_alive))
        except BaseException:
            if gw is not None:
                _quiet_close(gw, hard=False)
            self._end_redaction()
            raise
        self._gateway = gw
        self._owned = True
        try:
            self.group_id = self._select_group(c.group) if c.group else None
        except BaseException:
            self.close()
            raise
        log.info("connected to OMERO at %s as %s", c.server, c.user or "session user")
        return gw

    def reconnect(self) -> Any:
        """Drop the current connection (if any) and log in again with the same credentials."""
        if not self._owned:
            raise ConicQPError("the OMERO connection of this script was lost; run it again")
        if self._gateway is not None:
            _quiet_close(self._gateway, hard=False)
            self._gateway = None
        return self.connect()

    def close(self) -> None:
        gw, self._gateway = self._gateway, None
        if gw is not None and self._owned:
            # a password login created the session: end it; a joined one stays the user's
            _quiet_close(gw, hard=self.credentials.password is not None)
        self._end_redaction()

    def _end_redaction(self) -> None:
        if self._redact is not None:
            self._redact.close()
            self._redact = None

    def __enter__(self) -> OmeroConnection:
        self.gateway  # noqa: B018 - connect now, so errors surface at the start
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "connected" if self._gateway is not None else "closed"
        return f"OmeroConnection({self.credentials!s}, {state})"

    # -- groups --------------------------------------------------------------------------------
    def _select_group(self, group: str) -> int:
        """Switch the session to ``group`` (name or id); returns its id."""
        gw = self._gateway
        with omero_errors(f"switching to group {group!r}", self.server, self.secrets):
            groups = {int(g.getId()): str(g.getName()) for g in gw.getGroupsMemberOf()}
            wanted = [
                gid for gid, name in groups.items() if str(gid) == group.strip() or name == group
            ]
            if not wanted:
                have = ", ".join(sorted(groups.values())) or "none"
                raise ConicQPError(
                    f"you are not a member of OMERO group {group!r} on {self.server} (member "
                    f"of: {have}); pass {option('group')} with one of those"
                )
            gid = wanted[0]
            if gw.setGroupForSession(gid) is False:
                raise ConicQPError(f"OMERO at {self.server} refused to switch to group {group!r}")
            gw.SERVICE_OPTS.setOmeroGroup(gid)
        return gid

    def call(self, what: str) -> contextlib.AbstractContextManager[None]:
        """``with conn.call("reading image 3"):`` translates errors with this server's name."""
        return omero_errors(what, self.server, self.secrets)


def _quiet_close(gw: Any, hard: bool) -> None:
    """Close a gateway, ignoring errors (the server may already be gone)."""
    try:
        gw.close(hard=hard)
    except Exception as exc:  # closing a dead connection must not mask the real error
        log.debug("closing the OMERO connection failed: %s", type(exc).__name__)
