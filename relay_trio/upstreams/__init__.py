"""The upstream port (:mod:`.base`) and its implementations (``file://``, ``http(s)://``),
chosen by URL in :mod:`.factory`. To add an upstream kind: implement ``Upstream`` in a new
module and add its scheme to the factory.
"""
