"""``python -m coaflow.cli``: the same command line as ``coaflow``."""

from coaflow.cli import main

main()
