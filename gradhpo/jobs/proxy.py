"""``gradhpo storage-proxy``: Optuna's gRPC storage proxy in front of one study database.

Drivers on many machines (``gradhpo tune``/``resume``/``worker`` with
``storage: grpc://host:port``, or ``create_study(..., storage="grpc://host:port")``) then
talk to this one process instead of each holding connections to the database server: the
proxy keeps the database connections and a cache of finished trials. The database is any
storage URL a study accepts (``postgresql://``, ``mysql://``, ``sqlite:///``). The proxy
binds to 127.0.0.1 unless told otherwise; it has no authentication of its own, so bind it to
another address only on a trusted network.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from optuna.exceptions import ExperimentalWarning
from optuna.storages import run_grpc_proxy_server

from gradhpo.config import ConfigError
from gradhpo.search.study import GRPC_DEFAULT_PORT, mask_password, open_storage_url

__all__ = ["serve_storage_proxy", "GRPC_DEFAULT_PORT"]


def serve_storage_proxy(
    url: str,
    *,
    host: str = "127.0.0.1",
    port: int = GRPC_DEFAULT_PORT,
    announce: Callable[[str], None] = print,
) -> None:
    """Serve the storage at ``url`` on ``host:port`` until interrupted. Bad arguments and an
    unreachable database are a :class:`ConfigError` naming the field and value."""
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(
            f"--storage: expected a database URL such as 'postgresql://user:pw@host/db', "
            f"got {url!r}"
        )
    if url.startswith("grpc://"):
        raise ConfigError(
            f"--storage: {url!r} is itself a gRPC proxy; give the database URL it should serve"
        )
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"--port: expected an integer in [1, 65535], got {port!r}")
    if not isinstance(host, str) or not host:
        raise ConfigError(f"--host: expected an address to listen on, got {host!r}")
    try:
        storage = open_storage_url(url)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    announce(
        f"serving {mask_password(url)} as grpc://{host}:{port} "
        "(drivers: storage=grpc://HOST:PORT; Ctrl-C stops)"
    )
    try:
        with warnings.catch_warnings():  # experimental in Optuna since 4.2: we test it here
            warnings.simplefilter("ignore", ExperimentalWarning)
            run_grpc_proxy_server(storage, host=host, port=port)
    except RuntimeError as exc:  # grpc cannot bind (address in use, unknown host)
        raise ConfigError(f"--port: cannot listen on {host}:{port}: {exc}") from None
