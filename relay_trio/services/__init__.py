"""Trio services that drive the core: admission, delivery (senders, deadline scheduler),
event hub and publisher, dead letters and redrive, side queue. Long-lived ones have
``run(task_status)`` and are started by the composition root (:mod:`relay_trio.relay`).
"""
