"""The shared kernel every service imports: settings, errors, logs, ids, the server bootstrap,
TLS, keys, auth, tracing and metrics. It imports only the standard library, third-party packages
and ``gen/`` (tests/test_layers.py checks); the wiring of services lives in ``launch/``."""
