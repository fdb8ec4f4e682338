"""Daemon stages: one module per stage (ingest, window, prior, geometry, publish), each an async task."""
