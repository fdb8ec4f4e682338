"""One copy of each test helper (tests/conftest.py puts tests/ on sys.path: ``from helpers.x import y``).

- ``mosquitto``: pytest fixtures around the library's broker launcher (``daemon.broker.Mosquitto``);
- ``mqtt``: frames, MQTT configs and a raw collector of every message under a prefix;
- ``run_daemon``: ``geometryd run`` as a subprocess (``DaemonProcess``), the tiny model fixture, config files
  (through ``daemon.config.write_config``), a fake notify socket, a subscriber thread;
- ``procs``: a daemon's children (/proc), its /healthz and /metrics, ``wait_for``;
- ``clips``: the daemon tests' synthetic clips (``daemon.scenes``);
- ``whip``: an aiortc WHIP publisher;
- ``rtsp_server``: a GStreamer RTSP camera (run with Debian's python3);
- ``model_testutil``, ``pipeline_fixtures``: the network and pipeline parity helpers (the torch oracles
  themselves are the top-level ``reference`` package).

``free_port`` is ``daemon.broker.free_port``.
"""
