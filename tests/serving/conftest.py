import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_fixtures import server, tiny_dir, tool_model, trajectories  # noqa: E402,F401
