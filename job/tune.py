"""Entrypoint for ``ray job submit``: runs ``imdb-dist tune`` with the given arguments on the cluster.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env job/runtime_env.yaml \
        -- python job/tune.py --config job/configs/tune-local.yaml \
           --set data.path=/data/aclImdb_train.tar.gz --set run.output_dir=/shared/sweeps/imdb

The job's driver joins the cluster through the ``RAY_ADDRESS`` the job
system sets, and Ray Tune places the trials on its nodes. ``run.output_dir``
must be an absolute path that every node sees (the sweep's trials write
their run directories there, and an interrupted sweep resumes from it); a
relative one would land in the job's temporary working directory.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imdb_dist.cli import main  # after the path is set

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
