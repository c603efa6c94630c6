"""Features: the point-in-time engine and its numeric kernels, feature group tables, the feature registry."""
