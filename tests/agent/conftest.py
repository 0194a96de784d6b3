
from tests.models import sft_fixtures as fx

tiny_dir, trajectories = fx.tiny_dir, fx.trajectories  # shared fixtures
