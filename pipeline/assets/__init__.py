"""Dagster assets, one module per stage."""
