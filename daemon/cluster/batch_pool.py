"""`geometryd batch --ray`: a pool of Ray actors, each holding the model (daemon.offline.worker.BatchWorker).

Every actor asks for ``gpus_per_worker`` GPUs (Ray sets ``CUDA_VISIBLE_DEVICES``) plus a CPU share
(:data:`daemon.cluster.ray_env.ACTOR_CPUS`) and loads the networks in ``__init__``, on the actor's main
thread, where ``import_jittor`` can remove Jittor's process-wide signal handlers. Each actor has one video
in flight; the next goes to whichever actor finishes first. An actor that dies (OOM, SIGKILL) fails the one
video it held (reported in the manifest) and is restarted once by Ray; one that cannot come back is dropped.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon.cluster.ray_env import ACTOR_CPUS, cluster_gpus, init_ray, shutdown_ray
from daemon.offline.worker import BatchWorker, ProcessOptions, VideoResult

log = logging.getLogger(__name__)


class BatchActor:
    """The Ray actor class (wrapped with ``ray.remote`` in :func:`run_on_ray`)."""

    def __init__(self, opts: ProcessOptions, name: str) -> None:
        self.worker = BatchWorker(opts, name=f"{name}@pid{os.getpid()}")
        self.worker.start()
        # Jittor's SIGCHLD handler would quick-exit this worker when its sidecar dies: import_jittor removes
        # it, but only on the main thread. Refuse to serve if Ray ran us elsewhere.
        if signal.getsignal(signal.SIGCHLD) is not signal.SIG_DFL:
            raise RuntimeError("Jittor's SIGCHLD handler is installed in the batch actor (not loaded on the "
                               "main thread)")

    def ping(self) -> str:
        return self.worker.name

    def process(self, video: str, out: str) -> VideoResult:
        return self.worker.process(video, out)

    def close(self) -> None:
        self.worker.close()


def run_on_ray(address: str, opts: ProcessOptions, jobs: list[tuple[Path, Path]],
               on_result: Callable[[VideoResult], None], *, workers: int = 0, gpus_per_worker: float = 1.0,
               local_gpus: int | None = None) -> None:
    ray = init_ray(address, num_gpus=local_gpus)
    try:
        _run_pool(ray, opts, jobs, on_result, workers, gpus_per_worker)
    finally:
        if address == "local":
            shutdown_ray()


def _run_pool(ray: Any, opts: ProcessOptions, jobs: list[tuple[Path, Path]],
              on_result: Callable[[VideoResult], None], workers: int, gpus_per_worker: float) -> None:
    from ray.exceptions import RayActorError

    if workers <= 0:
        gpus = cluster_gpus()
        workers = max(1, int(gpus / gpus_per_worker)) if gpus_per_worker > 0 and gpus else 1
    workers = min(workers, len(jobs))
    # Ray sets OMP_NUM_THREADS=1 in an actor that asks for less than one CPU; the host-side math (Jittor's
    # OpenMP kernels, oneDNN) then sums in another order than `geometryd process` and results differ by
    # float16 steps. Give the actor this process's thread count: the same numbers as the serial path.
    threads = os.environ.get("OMP_NUM_THREADS") or str(os.cpu_count() or 1)
    actor_cls = ray.remote(num_gpus=gpus_per_worker, num_cpus=ACTOR_CPUS, max_restarts=1, max_task_retries=0,
                           runtime_env={"env_vars": {"OMP_NUM_THREADS": threads}})(BatchActor)
    actors = [actor_cls.remote(opts, f"batch-{i}") for i in range(workers)]
    log.info("ray batch pool", extra={"workers": workers, "gpus_per_worker": gpus_per_worker,
                                      "videos": len(jobs)})
    pending = list(jobs)
    idle = list(actors)
    inflight: dict[Any, tuple[Any, tuple[Path, Path]]] = {}
    try:
        while pending or inflight:
            while idle and pending:
                actor, job = idle.pop(0), pending.pop(0)
                inflight[actor.process.remote(str(job[0]), str(job[1]))] = (actor, job)
            if not inflight:  # every actor is gone
                for video, out in pending:
                    on_result(VideoResult(str(video), str(out), "failed", error="no live Ray worker left"))
                return
            ready, _ = ray.wait(list(inflight), num_returns=1)
            actor, (video, out) = inflight.pop(ready[0])
            try:
                on_result(ray.get(ready[0]))
                idle.append(actor)
            except RayActorError as exc:
                msg = " ".join(f"Ray worker died while processing: {exc}".split())[:500]
                on_result(VideoResult(str(video), str(out), "failed", error=msg))
                if _alive(ray, actor):  # restarted by Ray (max_restarts)
                    idle.append(actor)
    finally:
        for a in actors:
            try:
                ray.get(a.close.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - a dead actor has nothing to close
                pass
            ray.kill(a)


def _alive(ray: Any, actor: Any, timeout_s: float = 600.0) -> bool:
    try:
        ray.get(actor.ping.remote(), timeout=timeout_s)
        return True
    except Exception:  # noqa: BLE001 - dead for good (or not back in time)
        return False
