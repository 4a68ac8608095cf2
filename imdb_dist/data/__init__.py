"""Data: sources of labeled reviews (:mod:`.sources`), the verified download of the official archive
(:mod:`.download`) and the tf.data pipeline (:mod:`.pipeline`)."""
