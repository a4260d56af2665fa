"""Who may read ``/metrics``: the API's, and a worker's port (``worker/metrics_server.py``).

``metrics_allow`` (addresses and networks) and ``metrics_token`` (a bearer token) each restrict
it when set. A request from elsewhere gets a 403; one without the token a 401, with a wrong
token a 403, in OpenAI's error envelope like every refusal.
"""

from __future__ import annotations

import hmac
from ipaddress import IPv4Address, IPv6Address, ip_address

from app.core.errors import Forbidden, TunehouseError, Unauthorized
from app.core.settings import Settings


def restricted(settings: Settings) -> bool:
    return bool(settings.metrics_allow) or settings.metrics_token is not None


def refusal(
    settings: Settings, client_host: str | None, authorization: str | None
) -> TunehouseError | None:
    """Why this request may not read the metrics, or None when it may."""
    if settings.metrics_allow:
        address = _address(client_host)
        if address is None or not any(address in net for net in settings.metrics_allow):
            return Forbidden(
                f"The metrics may not be read from {client_host or 'an unknown address'} "
                "(metrics_allow).",
                code="metrics_address_not_allowed",
            )
    if settings.metrics_token is not None:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return Unauthorized(
                "The metrics need a token: send 'Authorization: Bearer <metrics_token>'.",
                code="missing_metrics_token",
            )
        expected = settings.metrics_token.get_secret_value().encode()
        if not hmac.compare_digest(token.strip().encode(), expected):
            return Forbidden("The metrics token is wrong.", code="invalid_metrics_token")
    return None


def _address(host: str | None) -> IPv4Address | IPv6Address | None:
    try:
        address = ip_address(host or "")
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # an IPv4 client of a dual-stack socket
    return address
