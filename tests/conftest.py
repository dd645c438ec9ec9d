"""Shared fixtures, one module per concern (each owned by the part that needs it):

- fixtures_store: the `tiny` embedded store, built once per session
- fixtures_viz:   small stores in the released viz_data format, and tables built from them
- fixtures_azurite: a real Azure Blob service (azurite, npm) on a loopback port
"""

import os

# Tests never touch the user's cache or data directory by accident.
os.environ.setdefault("CIRCUITS_CACHE", os.path.join(os.path.dirname(__file__), ".cache-unused"))

from fixtures_azurite import *  # noqa: E402,F401,F403
from fixtures_store import *  # noqa: E402,F401,F403
from fixtures_viz import *  # noqa: E402,F401,F403
