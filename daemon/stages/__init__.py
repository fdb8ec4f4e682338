"""The data flow of one source, in order: ingest_* -> window (admission) -> prior (+ preview) -> geometry ->
publish_*. ``runner.SourceRunner`` runs one source's stages as asyncio tasks with the parts the supervisor
hands it; each stage module holds that stage's logic and its process/thread boundary (the prior sidecar, the
geometry worker process, the ingest reader threads)."""
