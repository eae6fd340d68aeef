"""The store port (:mod:`.base`) and its implementations: ``memory`` and ``sqlite``."""
