"""Connecting to (or starting) a Ray cluster with the settings a small box needs.

Ray is imported here only, inside the functions (``geometryd --help`` must not pay for it). The traps handled
(docs/scale-out.md, "Ray traps"):

- ``address="local"`` starts a cluster inside this process with a bounded object store
  (``object_store_mb``; Ray's default takes 30 % of RAM) and no dashboard (~200 MB and a port we do not use);
  ``num_cpus`` defaults to the box's cores and ``num_gpus`` may be *logical* GPUs on a CPU box (tests).
- Usage-stats collection is off (it phones home at startup and these machines are offline).
- Actors that ask for ``num_gpus`` must also ask for a CPU share (:data:`ACTOR_CPUS`): with ``num_cpus=0``
  a pool of GPU actors on a box whose CPUs are all held by tasks never gets scheduled, and with Ray's
  default of 1 CPU a 2-core box fits only two actors.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)

ACTOR_CPUS = 0.25  # CPU share every GPU actor asks for besides its GPU (see the module docstring)
# Quiet and offline: no usage stats, no dedup'ed log forwarding of every worker's INFO lines.
RAY_ENV_DEFAULTS = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}


def init_ray(address: str, *, num_cpus: int | None = None, num_gpus: int | None = None,
             object_store_mb: int = 256, namespace: str = "geometryd") -> Any:
    """``ray.init`` for ``address`` = ``"local"`` (start one here), ``"auto"`` (the node's running cluster,
    from ``ray start``) or ``"ray://host:10001"`` (Ray Client). Returns the ``ray`` module."""
    for k, v in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    import ray

    if ray.is_initialized():
        return ray
    pythonpath = os.environ.get("PYTHONPATH")
    env = {"env_vars": {"PYTHONPATH": pythonpath}} if pythonpath else None
    if address == "local":
        cpus = num_cpus if num_cpus is not None else os.cpu_count() or 1
        ray.init(num_cpus=cpus, num_gpus=num_gpus, include_dashboard=False,
                 object_store_memory=object_store_mb * 1024 * 1024, namespace=namespace,
                 runtime_env=env, log_to_driver=True, configure_logging=False)
    else:
        ray.init(address=address, namespace=namespace, runtime_env=env, log_to_driver=True,
                 configure_logging=False)
    res = ray.cluster_resources()
    log.info("ray connected",
             extra={"address": address, "cpus": res.get("CPU", 0), "gpus": res.get("GPU", 0)})
    return ray


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
