import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
import sft_fixtures as fx  # noqa: E402

tiny_dir, trajectories = fx.tiny_dir, fx.trajectories  # shared fixtures
