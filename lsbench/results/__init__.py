"""The results store (Parquet + part files) and the row schemas."""
