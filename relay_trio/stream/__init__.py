"""The NDJSON stream front door: the receiver service and its listening sockets."""
