"""anyio primitives for hot paths, without anyio's backend lookup on every call.

``anyio.Event()`` asks sniffio which async library is running before it makes the backend's
event: a few microseconds that a journal commit pays once per batch it acknowledges and a
chunk load once per flight. :func:`event_factory` does the lookup once, inside the running
event loop, and returns the backend's own ``Event`` class.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio


def event_factory() -> Callable[[], anyio.Event]:
    """A callable making ``anyio.Event``s of the running backend (call it inside the loop).

    The backend's class is a subclass of ``anyio.Event``: calling it is what
    ``anyio.Event()`` does once it knows the backend, and if a backend ever routes its own
    class through the lookup again, calls are only slower, never wrong.
    """
    return type(anyio.Event())
