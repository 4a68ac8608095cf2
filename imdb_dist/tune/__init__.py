"""``imdb-dist tune``: a Ray Tune search over the config's own keys.

The config's ``tune:`` section (:class:`imdb_dist.config.TuneConfig`) names
the search space. Ray Tune runs one trial function per sampled config, as
Ray 2.60 supports tuning Train V2 jobs: a trial trains the config in its own
process (``imdb_dist.train.run``, its TensorFlow thread pools sized to the
trial's CPUs), or, with ``tune.workers_per_trial > 1``, launches a Ray Train
run of it with that many workers (``imdb_dist.launch``) from inside the
trial. Each trial reports its validation metric after every epoch, which an
ASHA scheduler uses to stop trials that trail; with ``tune.folds`` a trial
instead trains every fold of a k-fold split and reports once per fold,
scored by the folds' mean.

``run.output_dir`` of the sweep receives::

    results.csv   one row per trial: status, sampled values, metric, epochs run
    best.yaml     the best trial's complete config: imdb-dist train --config best.yaml
    trials.png    every trial's validation curve
    trials/<id>/  each trial's imdb-dist run directory (its fold{k}/ runs with tune.folds)
    sweep/        Ray Tune's own state: running the same command again resumes the sweep

The package, by job: :mod:`~imdb_dist.tune.space` checks the search space
and hands it to Ray Tune, :mod:`~imdb_dist.tune.sweep` runs the sweep,
:mod:`~imdb_dist.tune.trial` is one trial, and :mod:`~imdb_dist.tune.results`
writes what the sweep found. Importing it loads neither TensorFlow nor Ray
(the trial module, which does, is imported when a sweep starts), so a bad
space is refused before either loads.
"""

from imdb_dist.tune.results import BEST, RESULTS, SWEEP, TRIALS, TRIALS_PLOT
from imdb_dist.tune.space import SPACE_KINDS, check_space
from imdb_dist.tune.sweep import tune

__all__ = ["BEST", "RESULTS", "SPACE_KINDS", "SWEEP", "TRIALS", "TRIALS_PLOT", "check_space", "tune"]
