"""The sans-I/O core: ids, validation, limiter, resources, routing, UMH, event ring,
the NDJSON line protocol, configuration values. No Trio, no sockets, no clock of its own
(enforced by tests/test_layers.py): every function takes ``now`` from its caller.
"""
