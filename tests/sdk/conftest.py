"""Every vendor SDK, unchanged, against one real Parley server on the default model (SmolLM2-135M).

The SDKs are pointed at the server only through their documented options (base URL, key,
retries); nothing in them is mocked or patched. Their shared prompts and checks: sdk_common.py.
"""

from __future__ import annotations

import pytest

from sdk_common import KEY
from server import start_default_server


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    proc = start_default_server(tmp_path_factory, "sdk-server", "--api-key", KEY)
    yield proc
    proc.stop()
