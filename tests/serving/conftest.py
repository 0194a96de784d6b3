import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
from serve_fixtures import server, tool_model  # noqa: E402,F401
from sft_fixtures import tiny_dir, trajectories  # noqa: E402,F401
