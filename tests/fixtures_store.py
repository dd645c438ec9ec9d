"""Fixture: the tiny embedded store, built once per test session."""
