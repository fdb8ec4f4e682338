"""Live web viewer served by the daemon's HTTP server: results hub (hub.py), aiohttp routes (routes.py),
front-end sources (web/, built with vite into static/, which is committed so runtime needs no npm)."""
