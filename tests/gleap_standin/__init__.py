"""A loopback HTTP server that speaks Gleap's admin API and misbehaves on demand.

Tests talk to it over real sockets (not a mocked transport) so that connection pooling,
keep-alive, timeouts and dropped connections behave as they do in production. Stdlib only.

Its modules, each importing only those above it:

- ``wire``: Gleap's paths and limits, a recorded request, the answers, a valid track body;
- ``faults``: the fault rules a test sets (``fail_next``, ``set_down``, ``hold``...) and what
  they decide for each request;
- ``routes``: what each route answers, and what it leaves behind (contacts, events, the log);
- ``server``: the threading HTTP server and its handler;
- ``standin``: ``GleapStandIn``, its lifecycle and what it was told.
"""

from tests.gleap_standin.faults import BackgroundFaults
from tests.gleap_standin.standin import GleapStandIn
from tests.gleap_standin.wire import (
    AUTH_PATH,
    CONTACTS_PATH,
    IDENTIFY_PATH,
    TRACK_PATH,
    RecordedRequest,
    track_problem,
)

__all__ = [
    "AUTH_PATH",
    "CONTACTS_PATH",
    "IDENTIFY_PATH",
    "TRACK_PATH",
    "BackgroundFaults",
    "GleapStandIn",
    "RecordedRequest",
    "track_problem",
]
