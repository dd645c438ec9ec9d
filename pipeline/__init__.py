"""pipeline: Dagster assets from a circuit store to Parquet tables and a DuckDB database,
and the builder of the embedded demo store (`pipeline.demo`)."""
