"""Entrypoint for ``ray job submit``: runs ``imdb-dist tune`` with the given arguments.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env job/runtime_env.yaml \
        -- python job/tune.py --config job/configs/tune-local.yaml --set data.path=...

Like ``job/train.py``: the uploaded working directory goes first on
``sys.path``, so the submitted code is what runs. The sweep joins the
cluster the job runs on (``RAY_ADDRESS``); ``run.output_dir`` must be an
absolute path on storage every node shares.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imdb_dist.cli import main  # noqa: E402  (after the path is set)

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
