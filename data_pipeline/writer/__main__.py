"""`python -m data_pipeline.writer`: the writer's command line (data_pipeline/writer/cli.py)."""

import sys

from data_pipeline.writer.cli import main

if __name__ == "__main__":
    sys.exit(main())
