"""Cluster mode (``store = "nats"``): N relays share admission and delivery on NATS JetStream.

Imported only by the composition root when the config names the ``nats`` store, so a relay
with the default store never imports ``nats`` (docs/cluster.md)."""
