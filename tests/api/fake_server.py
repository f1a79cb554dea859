"""`python tests/api/fake_server.py serve ...`: the real CLI and app around the fake engine."""

import pathlib
import sys

HERE = pathlib.Path(__file__).parent
# this checkout's parley, not the one the editable install points at (a worktree's tests test its own code)
sys.path[:0] = [str(HERE), str(HERE.parent.parent)]

from fake_engine import FakeEngine  # noqa: E402

from parley.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:], engine_loader=FakeEngine.load))
