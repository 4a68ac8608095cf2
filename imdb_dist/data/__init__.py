"""Data: sources of labeled reviews (:mod:`.sources`) and the tf.data pipeline (:mod:`.pipeline`)."""
