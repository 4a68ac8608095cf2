"""The run directory: the one owner of every file a run reads and writes there, local or on remote storage.

:class:`RunDir` is the run directory of one process, behind one interface
whether it is a local (or mounted) path or a ``pyarrow.fs`` URI
(:mod:`imdb_dist.storage`):

- **the run's files**: the config, the fingerprint and its changes
  (computed and compared by :mod:`imdb_dist.fingerprint`), the vocabulary,
  the metrics logs, the Ray worker groups' history and the report are read
  and written through it (:mod:`imdb_dist.rundir.files` names them).
- **decisions**: :meth:`RunDir.fetch` brings the small files a decision
  reads into the local working copy :attr:`RunDir.work`;
  :meth:`RunDir.holds_complete` and :meth:`RunDir.take` decide on them
  whether the run is new, resumes or is already complete, for
  ``imdb-dist train`` and the Ray driver alike.
- **the lease** (:mod:`imdb_dist.lease`): one live run writes the directory.
- **progress**: :meth:`RunDir.sync` uploads what changed since the last sync
  (a log that only grew: just its new lines or records, as a segment:
  :mod:`imdb_dist.rundir.remote`).
- **publish**: :meth:`RunDir.publish` uploads the finished run: the model's
  new version with its marker last (:mod:`imdb_dist.rundir.versions`), then
  ``report.json``, which marks the run complete.

TensorFlow reads and writes local files only, so every process works in
``work``: the directory itself when it is local, else a scratch directory
this class fills and drains. Only the chief writes.

A run directory is complete when ``report.json`` exists: written last,
atomically.
"""

from imdb_dist.rundir.directory import RunDir
from imdb_dist.rundir.files import (
    CHANGES,
    CHECKPOINTS,
    CONFIG,
    CURVES,
    FINGERPRINT,
    MANIFEST,
    METRICS,
    MODEL,
    PREPARED,
    REPORT,
    STEPS,
    TENSORBOARD,
    TRACKING,
    VOCAB,
    WORKER_GROUPS,
    JsonLog,
    atomic_write,
    check_writable,
    read_metrics,
    read_vocab,
)
from imdb_dist.rundir.versions import MODEL_MARKER

__all__ = [
    "CHANGES", "CHECKPOINTS", "CONFIG", "CURVES", "FINGERPRINT", "MANIFEST", "METRICS", "MODEL",
    "MODEL_MARKER", "PREPARED", "REPORT", "STEPS", "TENSORBOARD", "TRACKING", "VOCAB", "WORKER_GROUPS", "JsonLog", "RunDir",
    "atomic_write", "check_writable", "read_metrics", "read_vocab",
]
