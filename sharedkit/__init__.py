"""setpoint's kit: small dependency-free helpers shared by every side (stdlib only).

* :mod:`files`: atomic file replacement (``O_NOFOLLOW``, fsync of file and directory) and
  durable appends of whole lines;
* :mod:`logjson`: the one JSON log line format;
* :mod:`backoff`: the one backoff policy (exponential, equal jitter) and its retry counter;
* :mod:`brokers`: the one broker-settings class (host, port, TLS files, credentials), and
  ``--broker`` URLs, with ``mqtt+srv://`` names resolved into nodes;
* :mod:`tasks`: stopping an asyncio task without swallowing the caller's own cancellation.

Below the controller, the shim and the CLI, beside :mod:`setpoint.proto`; imports nothing
of setpoint's and nothing outside the standard library (import-linter checks it), with one
exception: :mod:`brokers` imports dnspython inside the function that resolves a ``+srv``
name, so it is loaded only when one is given.
"""
