"""The LayerSkip training recipe, `lsbench train` and the `make ab` twins."""
