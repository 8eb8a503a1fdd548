"""One TLS context for every HTTP client the process makes (Gleap's, the alerts' webhooks).

httpx builds a context of its own for each client it is given no context for, loading the CA
bundle each time: ~140 certificates, ~45 ms of CPU and ~30,000 small blocks from C's malloc.
The daemon makes a Gleap client for each delivery pass, so every pass loaded the bundle again
and freed it, its blocks scattered among the ones that stay; under heaptrack (issue 22), every
context made in a 16-minute window at the soak's pace was still allocated at its end, 1.4 MB in
all on both stores. A context is safe to share between threads and event loops once set up; it
is made on first use, so a process that sends nothing loads nothing.
"""

from __future__ import annotations

import functools
import ssl

import httpx


@functools.cache
def client_context() -> ssl.SSLContext:
    """The process's TLS context: httpx's default (certifi's CA bundle, or the one that
    ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` name), verifying certificates and host names."""
    return httpx.create_ssl_context()
