"""Side-queue sinks (audit file, UDP, webhook) behind the ``SideSink`` port, built by
:mod:`.factory` from the settings.
"""
