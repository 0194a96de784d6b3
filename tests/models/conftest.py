
from tests.models.sft_fixtures import tiny_dir, trajectories  # noqa: E402,F401
