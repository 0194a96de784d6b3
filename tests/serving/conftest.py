
from tests.models.sft_fixtures import tiny_dir, trajectories  # noqa: E402,F401
from tests.serving.serve_fixtures import server, tool_model  # noqa: E402,F401
