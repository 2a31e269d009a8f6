"""The pure domain of dais: values, rules, policies, ports and use cases.

Nothing here does I/O or imports a framework; another service can embed it
with only attrs and cattrs installed.
"""

from __future__ import annotations

from dais_core.checks import check_for
from dais_core.errors import (
    CorruptData,
    DaisError,
    Forbidden,
    IncompleteBody,
    InvalidData,
    InvalidResourceId,
    InvalidRoute,
    NotFound,
    PublishFailed,
    RequestTimeout,
    Throttled,
    TooLarge,
    Unauthenticated,
    UnauthorisedPublish,
    Unavailable,
    UnsupportedType,
    UpstreamTimeout,
    UpstreamUnreachable,
    status_for,
)
from dais_core.gateway import GatewayCall, parse_gateway_path, upstream_headers
from dais_core.keys import NewKey, hash_secret, new_key, parse_token
from dais_core.policies import (
    ConcurrencyCap,
    Decision,
    KeyedLocks,
    RatePolicy,
    Target,
    Throttler,
    gcra,
    map_resource,
    match_permission,
    resolve_endpoint,
)
from dais_core.ports import (
    Clock,
    Forwarder,
    ForwardRequest,
    Inspector,
    KeyStore,
    Readable,
    ServiceRegistry,
    StagedWrite,
    Storage,
    ThrottleState,
)
from dais_core.rules import (
    Location,
    check_name,
    check_resource_id,
    is_under,
    normalise_prefix,
    normalise_route,
    parse_location,
    resource_id_from_target,
)
from dais_core.usecases import (
    Explanation,
    PublishResult,
    Route,
    authenticate,
    authorise_call,
    explain,
    publish,
)
from dais_core.values import (
    ApiKey,
    Credential,
    DataType,
    ForwardRecord,
    Grant,
    KeyRequest,
    Permission,
    PublishRecord,
    ServiceEndpoint,
)

__all__ = [
    # values
    "ApiKey",
    "Credential",
    "DataType",
    "ForwardRecord",
    "Grant",
    "KeyRequest",
    "Permission",
    "PublishRecord",
    "ServiceEndpoint",
    # rules
    "GatewayCall",
    "Location",
    "check_name",
    "check_resource_id",
    "is_under",
    "normalise_prefix",
    "normalise_route",
    "parse_gateway_path",
    "parse_location",
    "resource_id_from_target",
    "upstream_headers",
    # keys
    "NewKey",
    "hash_secret",
    "new_key",
    "parse_token",
    # policies
    "ConcurrencyCap",
    "Decision",
    "KeyedLocks",
    "RatePolicy",
    "Target",
    "Throttler",
    "check_for",
    "gcra",
    "map_resource",
    "match_permission",
    "resolve_endpoint",
    # ports
    "Clock",
    "ForwardRequest",
    "Forwarder",
    "Inspector",
    "KeyStore",
    "Readable",
    "ServiceRegistry",
    "StagedWrite",
    "Storage",
    "ThrottleState",
    # use cases
    "Explanation",
    "PublishResult",
    "Route",
    "authenticate",
    "authorise_call",
    "explain",
    "publish",
    # errors
    "CorruptData",
    "DaisError",
    "Forbidden",
    "IncompleteBody",
    "InvalidData",
    "InvalidResourceId",
    "InvalidRoute",
    "NotFound",
    "PublishFailed",
    "RequestTimeout",
    "Throttled",
    "TooLarge",
    "Unauthenticated",
    "UnauthorisedPublish",
    "Unavailable",
    "UnsupportedType",
    "UpstreamTimeout",
    "UpstreamUnreachable",
    "status_for",
]
