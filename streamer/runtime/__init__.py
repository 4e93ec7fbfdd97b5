"""The runtime: chunk cache, loaders, interest sets, delta queues, journal and flushers.

``World`` (``runtime/world.py``) owns them all in one task group.
"""
