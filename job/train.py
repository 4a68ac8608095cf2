"""Entrypoint for ``ray job submit``: runs ``imdb-dist launch`` with the given arguments.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env job/runtime_env.yaml \
        -- python job/train.py --config job/configs/ray-local.yaml

The job's driver runs this file from the uploaded working directory; it puts
that directory first on ``sys.path`` so the submitted code, not whatever
version is installed on the head node, is what runs.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imdb_dist.cli import main  # after the path is set

if __name__ == "__main__":
    sys.exit(main(["launch", *sys.argv[1:]]))
