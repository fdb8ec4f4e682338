"""Wiring of the web-facing parts (WHIP ingest + live viewer) into the daemon's HTTP app.

:func:`build_web` is called once by the supervisor before the HTTP server starts; it returns the webrtc
sources (the supervisor's ``_make_ingest`` hands them to the feeders), the results hub (the supervisor pushes
every published result into it) and the ``setup(app)`` callback that registers the routes.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from daemon.config import Config
from daemon.metrics import Metrics
from daemon.stages.ingest_webrtc import WebrtcSource, WebrtcSources, add_whip_routes, limit_ice_addresses
from daemon.viewer import routes
from daemon.viewer.hub import ResultsHub


def build_web(cfg: Config, metrics: Metrics) -> tuple[WebrtcSources, ResultsHub,
                                                      Callable[[web.Application], None]]:
    limit_ice_addresses(cfg.http.bind)
    g = cfg.geometry
    sources: dict[str, WebrtcSource] = {}
    for name, src in cfg.sources.items():
        if src.type != "webrtc":
            continue

        def dropped(n: int, name: str = name) -> None:
            # a frame lost before the feeder saw it still enters the frame invariant: in + dropped
            for _ in range(n):
                metrics.frame_in(name)
            metrics.drop(name, "webrtc_queue", n)

        def up(is_up: bool, name: str = name) -> None:
            metrics.source_up.labels(name).set(1 if is_up else 0)

        sources[name] = WebrtcSource(name, g.height, g.width, on_dropped=dropped, on_up=up)
    webrtc = WebrtcSources(sources)
    hub = ResultsHub(list(cfg.sources))
    types: dict[str, str] = {name: src.type for name, src in cfg.sources.items()}

    def setup(app: web.Application) -> None:
        add_whip_routes(app, webrtc)
        routes.add_routes(app, hub, lambda: types)

    return webrtc, hub, setup
