"""`python tests/api/fake_server.py serve ...`: the real CLI and app around the fake engine."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from fake_engine import FakeEngine  # noqa: E402

from parley.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:], engine_loader=FakeEngine.load))
