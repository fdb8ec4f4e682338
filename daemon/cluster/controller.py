"""`geometryd cluster --config FILE`: the controller of GPU actors on a Ray cluster.

It connects to Ray (``[cluster] address``), starts one :class:`daemon.cluster.gpu_actor.GpuActor` per GPU
(``num_gpus = gpus_per_actor`` plus a CPU share, ``max_restarts``), assigns the config's sources to them
(daemon.cluster.assign: cost = width x height x fps), and polls them every ``status_interval_s``.

Failures: an actor that stops answering (process killed, node lost) is *down*. Ray restarts it up to
``max_restarts`` times; a restarted actor (new incarnation, no runs) gets its sources again
("restarted"). One that is dead for good, or not back within ``restart_timeout_s``, loses its sources to the
live actors ("moved"). Either way a source restarts from its beginning (a file from frame 0, a camera
from "now"), and the frames the dead run had taken in but not published by its last status are counted as
``dropped{actor_died}`` in the controller's per-source totals, so
``frames_in == frames_out + skipped + dropped`` holds over all runs of a source.

The assignment, actor states, moves and measured recovery times are published retained on
``<prefix>/cluster/status`` (JSON) and served on the controller's /healthz and /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from daemon.cluster.assign import assign, relative_load, source_cost
from daemon.cluster.gpu_actor import GpuActor
from daemon.cluster.ray_env import ACTOR_CPUS, cluster_gpus, init_ray, shutdown_ray
from daemon.config import to_toml
from daemon.http import HttpServer
from daemon.video import VideoError, probe

log = logging.getLogger(__name__)

STATUS_SCHEMA = 1



@dataclass
class SourceTotals:
    """One source over all its runs (a restart or move starts a new run)."""

    frames_in: int = 0
    frames_out: int = 0
    skipped: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def add(self, s: dict[str, Any]) -> None:
        self.frames_in += s["frames_in"]
        self.frames_out += s["frames_out"]
        self.skipped += s["skipped"]
        for k, v in s["dropped"].items():
            self.dropped[k] = self.dropped.get(k, 0) + v

    def plus(self, s: dict[str, Any] | None) -> dict[str, Any]:
        t = SourceTotals(self.frames_in, self.frames_out, self.skipped, dict(self.dropped))
        if s is not None:
            t.add(s)
        d = dict(t.__dict__)
        d["balanced"] = t.frames_in == t.frames_out + t.skipped + sum(t.dropped.values())
        return d


@dataclass
class ActorState:
    name: str
    handle: Any
    state: str = "starting"  # starting | up | down | dead
    incarnation: str | None = None
    pid: int | None = None
    node: str | None = None
    gpu_ids: list[str] = field(default_factory=list)
    restarts: int = 0
    capacity: float = 1.0
    measured: bool = False
    down_since: float | None = None
    slow_since: float | None = None
    last_status: dict[str, Any] = field(default_factory=dict)


class ClusterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.actors_up = Gauge("geometryd_cluster_actors_up", "GPU actors answering", registry=r)
        self.actors = Gauge("geometryd_cluster_actors", "GPU actors started", registry=r)
        self.assigned = Gauge("geometryd_cluster_source_assigned", "1 for the actor a source runs on",
                              ["source", "actor"], registry=r)
        self.restarts = Counter("geometryd_cluster_actor_restarts", "actor restarts seen", ["actor"],
                                registry=r)
        self.moves = Counter("geometryd_cluster_source_moves", "sources moved or restarted",
                             ["source", "kind"],
                             registry=r)
        self.recovery = Gauge("geometryd_cluster_recovery_seconds",
                              "last failure: actor down -> the source publishing again", ["source"],
                              registry=r)
        self.frames = Gauge("geometryd_cluster_frames", "per-source frames over all runs", ["source", "kind"],
                            registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class Controller:
    def __init__(self, cfg: Any, *, exit_when_done: bool = False, summary_path: str | None = None) -> None:
        self.cfg = cfg
        self.cc = cfg.cluster
        self.exit_when_done = exit_when_done
        self.summary_path = summary_path
        self.metrics = ClusterMetrics()
        self.stop_event = asyncio.Event()
        self.state = "starting"
        self.actors: dict[str, ActorState] = {}
        self.assignment: dict[str, str] = {}  # source -> actor
        self.run_of: dict[str, tuple[str, str]] = {}  # source -> (actor, run_id) of its current run
        self.totals: dict[str, SourceTotals] = {s: SourceTotals() for s in cfg.sources}
        self.pending_recovery: dict[str, dict[str, Any]] = {}  # source -> move being recovered
        self.moves: list[dict[str, Any]] = []
        self.costs: dict[str, float] = {}
        self._run_ids = 0
        self._cfg_toml = ""
        self._mqtt: Any = None
        self.ray: Any = None

    # ---- lifecycle -------------------------------------------------------------------------------------
    def request_stop(self, why: str = "signal") -> None:
        if not self.stop_event.is_set():
            log.info("stop requested", extra={"reason": why})
            self.stop_event.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)

        self._cfg_toml = to_toml(self.cfg)
        rc = 0
        async with contextlib.AsyncExitStack() as stack:
            if self.cfg.http.enabled:
                http = HttpServer(self.cfg.http.bind, self.cc.http_port, self.metrics.render, self.health,
                                  self.cfg.http.token)
                await stack.enter_async_context(http)
                log.info("cluster http listening", extra={"port": http.port})
            try:
                await self._start()
                rc = await self._serve()
            except Exception as exc:
                log.error("cluster failed: %s: %s", type(exc).__name__, exc)
                log.debug("traceback", exc_info=True)
                rc = 1
            finally:
                await self._shutdown()
        return rc

    async def _start(self) -> None:
        cc = self.cc
        self.ray = ray = await asyncio.to_thread(
            init_ray, cc.address, num_cpus=cc.local_cpus or None,
            num_gpus=None if cc.local_gpus < 0 else cc.local_gpus, object_store_mb=cc.object_store_mb)
        n = cc.actors
        if n == 0:
            gpus = cluster_gpus()
            n = max(1, int(gpus / cc.gpus_per_actor)) if cc.gpus_per_actor > 0 and gpus else 1
        cls = ray.remote(GpuActor).options(num_gpus=cc.gpus_per_actor, num_cpus=ACTOR_CPUS,
                                           max_restarts=cc.max_restarts, max_task_retries=0,
                                           max_concurrency=4)
        for i in range(n):
            name = f"gpu-{i}"
            self.actors[name] = ActorState(name, cls.remote(name), capacity=max(cc.gpus_per_actor, 1e-3))
        self.metrics.actors.set(n)
        infos = await asyncio.gather(*(self._call(a, "info", timeout=300) for a in self.actors.values()))
        for a, info in zip(self.actors.values(), infos, strict=True):
            self._note_info(a, info)
        self.costs = {name: self._cost(src) for name, src in self.cfg.sources.items()}
        live = {a.name: a.capacity for a in self.actors.values() if a.state == "up"}
        self.assignment = assign(self.costs, live)
        by_actor: dict[str, list[str]] = {}
        for src, actor in sorted(self.assignment.items()):
            by_actor.setdefault(actor, []).append(src)
        for actor, sources in by_actor.items():
            await self._start_run(self.actors[actor], sources, kind="assigned")
        self.state = "ready"
        await self._publish_status()

    def _cost(self, src: Any) -> float:
        g = self.cfg.geometry
        fps = self.cc.default_fps
        if src.type == "file":
            with contextlib.suppress(VideoError):
                fps = probe(src.path).fps or fps
        return source_cost(g.width, g.height, fps)

    async def _call(self, a: ActorState, method: str, *args: Any, timeout: float) -> Any:
        ref = getattr(a.handle, method).remote(*args)
        return await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout)

    def _note_info(self, a: ActorState, info: dict[str, Any]) -> None:
        a.state, a.incarnation, a.pid = "up", info["incarnation"], info["pid"]
        a.node, a.gpu_ids = info["node"], info["gpu_ids"]
        log.info("actor up", extra={"actor": a.name, "pid": a.pid, "gpus": ",".join(a.gpu_ids),
                                    "cuda_visible_devices": info.get("cuda_visible_devices")})

    async def _start_run(self, a: ActorState, sources: list[str], kind: str, reason: str = "",
                         moved_from: str | None = None) -> None:
        self._run_ids += 1
        run_id = f"r{self._run_ids}"
        await self._call(a, "start_sources", run_id, self._cfg_toml, sources, timeout=60)
        for s in sources:
            self.run_of[s] = (a.name, run_id)
            self.assignment[s] = a.name
        if kind != "assigned":
            now = time.time()
            for s in sources:
                move = {"source": s, "kind": kind, "from": moved_from, "to": a.name, "reason": reason,
                        "down_at": now if moved_from is None else self.actors[moved_from].down_since,
                        "started_at": now, "recovered_at": None, "recovery_s": None, "run": run_id}
                self.moves.append(move)
                self.pending_recovery[s] = move
                self.metrics.moves.labels(s, kind).inc()
        log.info("sources started", extra={"actor": a.name, "run": run_id, "sources": ",".join(sources),
                                           "kind": kind})

    # ---- serving ---------------------------------------------------------------------------------------
    async def _serve(self) -> int:
        interval = self.cc.status_interval_s
        while not self.stop_event.is_set():
            await self._poll()
            await self._publish_status()
            if self.exit_when_done and self._all_files_done():
                self.request_stop("all file sources done")
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), interval)
        failed = [s for s in self.cfg.sources if self._source_status(s).get("state") == "failed"]
        return 1 if failed and self.exit_when_done else 0

    def _all_files_done(self) -> bool:
        files = [n for n, s in self.cfg.sources.items() if s.type == "file"]
        return bool(files) and all(self._source_status(s).get("state") in ("done", "failed") for s in files)

    def _source_status(self, source: str) -> dict[str, Any]:
        actor, run_id = self.run_of.get(source, (None, None))
        if actor is None:
            return {}
        run = self.actors[actor].last_status.get("runs", {}).get(run_id, {})
        return run.get("sources", {}).get(source, {})

    async def _poll(self) -> None:
        actors = list(self.actors.values())
        results = await asyncio.gather(*(self._call(a, "status",
                                                    timeout=max(5.0, 3 * self.cc.status_interval_s))
                                         for a in actors if a.state in ("up", "down")),
                                       return_exceptions=True)
        polled = [a for a in actors if a.state in ("up", "down")]
        now = time.time()
        for a, res in zip(polled, results, strict=True):
            if isinstance(res, asyncio.TimeoutError) and a.state == "up":
                # slow (a loaded box), not dead: Ray reports a dead actor with RayActorError
                a.slow_since = a.slow_since or now
                if now - a.slow_since <= self.cc.restart_timeout_s:
                    log.warning("actor slow to answer", extra={"actor": a.name})
                    continue
            if isinstance(res, BaseException):
                await self._on_unreachable(a, res)
            else:
                a.slow_since = None
                await self._on_status(a, res)
        self._recheck_recoveries()
        self._update_metrics()

    async def _on_status(self, a: ActorState, status: dict[str, Any]) -> None:
        if a.incarnation is not None and status["incarnation"] != a.incarnation:  # Ray restarted it
            if a.state == "up":  # died and came back between two polls
                a.down_since = time.time()
                self._account_dead_runs(a)
            a.restarts += 1
            self.metrics.restarts.labels(a.name).inc()
            self._note_info(a, status)
            a.last_status = status
            lost = sorted(s for s, (act, _) in self.run_of.items() if act == a.name)
            if lost:
                await self._start_run(a, lost, kind="restarted", reason="actor restarted by Ray",
                                      moved_from=None)
                for s in lost:
                    self.pending_recovery[s]["down_at"] = a.down_since or time.time()
            a.down_since = None
            return
        if a.state == "down":
            a.state, a.down_since = "up", None
        a.last_status = status
        if not a.measured:
            for run in status.get("runs", {}).values():
                w = run.get("warmup_s")
                if w:
                    g = self.cfg.geometry
                    a.capacity, a.measured = g.window_size * g.width * g.height / w, True
                    break

    async def _on_unreachable(self, a: ActorState, exc: BaseException) -> None:
        now = time.time()
        if a.state == "up":
            a.state, a.down_since = "down", now
            log.warning("actor down", extra={"actor": a.name, "error": f"{type(exc).__name__}: {exc}"[:300]})
            self._account_dead_runs(a)
        # Ray restarts an actor at most max_restarts times; past that it cannot come back.
        spent = a.restarts >= self.cc.max_restarts
        if spent or (a.down_since is not None and now - a.down_since > self.cc.restart_timeout_s):
            a.state = "dead"
            with contextlib.suppress(Exception):
                self.ray.kill(a.handle, no_restart=True)
            await self._move_sources_of(a, "restarts spent" if spent else "actor not back in time")

    def _account_dead_runs(self, a: ActorState) -> None:
        """Fold the dead runs' last counters into the totals; what they held unpublished is lost."""
        for run_id, run in a.last_status.get("runs", {}).items():
            for s, st in run.get("sources", {}).items():
                if self.run_of.get(s) != (a.name, run_id):
                    continue
                lost = st["frames_in"] - st["frames_out"] - st["skipped"] - sum(st["dropped"].values())
                st = {**st, "dropped": {**st["dropped"], "actor_died": lost}}
                self.totals[s].add(st)
        for s, (act, _) in list(self.run_of.items()):
            if act == a.name:
                self.run_of[s] = (act, "")  # no current run until restarted or moved
        a.last_status = {}

    async def _move_sources_of(self, a: ActorState, reason: str) -> None:
        orphans = sorted(s for s, (act, _) in self.run_of.items() if act == a.name)
        live = {x.name: x.capacity for x in self.actors.values() if x.state == "up"}
        if not orphans:
            return
        if not live:
            log.error("no live actor for sources", extra={"sources": ",".join(orphans)})
            return
        keep = {s: act for s, act in self.assignment.items() if act in live}
        new = assign(self.costs, live, keep)
        by_actor: dict[str, list[str]] = {}
        for s in orphans:
            by_actor.setdefault(new[s], []).append(s)
        for target, sources in by_actor.items():
            await self._start_run(self.actors[target], sources, kind="moved", reason=reason,
                                  moved_from=a.name)

    def _recheck_recoveries(self) -> None:
        for s, move in list(self.pending_recovery.items()):
            st = self._source_status(s)
            if st.get("frames_out", 0) > 0 or st.get("state") in ("done",):
                move["recovered_at"] = time.time()
                move["recovery_s"] = round(move["recovered_at"] - (move["down_at"] or move["started_at"]), 3)
                self.metrics.recovery.labels(s).set(move["recovery_s"])
                log.info("source recovered", extra={"source": s, "kind": move["kind"], "to": move["to"],
                                                    "recovery_s": move["recovery_s"]})
                del self.pending_recovery[s]

    def _update_metrics(self) -> None:
        m = self.metrics
        m.actors_up.set(sum(1 for a in self.actors.values() if a.state == "up"))
        m.assigned.clear()
        for s, actor in self.assignment.items():
            m.assigned.labels(s, actor).set(1)
        for s in self.cfg.sources:
            t = self.totals[s].plus(self._source_status(s) or None)
            for kind in ("frames_in", "frames_out", "skipped"):
                m.frames.labels(s, kind).set(t[kind])
            m.frames.labels(s, "dropped").set(sum(t["dropped"].values()))

    # ---- status ----------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        live = {a.name: a.capacity for a in self.actors.values() if a.state == "up"}
        loads = relative_load(self.assignment, self.costs, live) if live else {}
        actors = {a.name: {"state": a.state, "pid": a.pid, "node": a.node, "gpu_ids": a.gpu_ids,
                           "restarts": a.restarts, "capacity": a.capacity, "capacity_measured": a.measured,
                           "load": round(loads.get(a.name, 0.0), 4),
                           "sources": sorted(s for s, act in self.assignment.items() if act == a.name)}
                  for a in self.actors.values()}
        sources = {}
        for s in self.cfg.sources:
            st = self._source_status(s)
            actor, run_id = self.run_of.get(s, (None, None))
            sources[s] = {"actor": self.assignment.get(s), "run": run_id or None, "state": st.get("state"),
                          "cost": self.costs.get(s), **self.totals[s].plus(st or None)}
        return {"schema": STATUS_SCHEMA, "state": self.state, "t": time.time(), "actors": actors,
                "assignment": dict(sorted(self.assignment.items())), "sources": sources, "moves": self.moves}

    def health(self) -> dict[str, Any]:
        st = self.status()
        up = [a for a in st["actors"].values() if a["state"] == "up"]
        placed = all(st["actors"].get(a, {}).get("state") == "up" for a in self.assignment.values())
        st["ok"] = self.state == "ready" and bool(up) and placed
        return st

    async def _publish_status(self, state: str | None = None) -> None:
        if not self.cfg.mqtt.enabled:
            return
        body = self.status()
        if state is not None:
            body["state"] = state
        payload = json.dumps(body, default=str).encode()
        try:
            client = await self._mqtt_client()
            await client.publish(f"{self.cfg.mqtt.topic_prefix}/cluster/status", payload, qos=1, retain=True)
        except Exception as exc:  # broker away: the next tick tries again
            log.warning("cluster status not published: %s", exc)
            await self._close_mqtt()

    async def _mqtt_client(self) -> Any:
        if self._mqtt is None:
            import aiomqtt

            m = self.cfg.mqtt
            tls = aiomqtt.TLSParameters(ca_certs=m.ca_file or None) if m.tls else None
            client = aiomqtt.Client(m.host, m.port, identifier=f"geometryd-cluster-{int(time.time())}",
                                    username=m.username or None, password=m.password or None,
                                    protocol=aiomqtt.ProtocolVersion.V5, tls_params=tls,
                                    keepalive=m.keepalive_s)
            await client.__aenter__()
            self._mqtt = client
        return self._mqtt

    async def _close_mqtt(self) -> None:
        if self._mqtt is not None:
            with contextlib.suppress(Exception):
                await self._mqtt.__aexit__(None, None, None)
            self._mqtt = None

    async def _shutdown(self) -> None:
        self.state = "stopping"
        for a in self.actors.values():
            if a.state == "up":
                with contextlib.suppress(Exception):
                    a.last_status = await self._call(a, "stop", self.cfg.daemon.shutdown_grace_s + 30,
                                                     timeout=self.cfg.daemon.shutdown_grace_s + 60)
        self.state = "stopped"
        await self._publish_status()
        await self._close_mqtt()
        if self.summary_path:
            with open(self.summary_path, "w", encoding="utf-8") as f:
                json.dump(self.status(), f, indent=1, default=str)
        for a in self.actors.values():
            with contextlib.suppress(Exception):
                self.ray.kill(a.handle, no_restart=True)
        if self.ray is not None and self.cc.address == "local":
            await asyncio.to_thread(shutdown_ray)
