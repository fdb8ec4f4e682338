"""WebRTC ingest end to end: ``geometryd run`` (subprocess; tiny model; real mosquitto) with a webrtc source.

1. An aiortc client (this process) publishes a synthetic numpy track through WHIP; its frames reach the
   pipeline and results arrive on MQTT (``daemon.wire.subscribe.iter_frames``).
2. Protocol errors (bad SDP, missing/wrong token, busy source, unknown session/source, wrong content
   type) answer clean 4xx and the daemon stays healthy; a new session after DELETE is accepted.
3. Headless Debian Chromium publishes its fake camera through the viewer's WHIP page (token via
   ``?access_token=``); the viewer page shows a depth image that is not blank (screenshot pixel std);
   the screenshot is saved as docs/viewer.png when GEOMETRYD_SAVE_VIEWER_PNG=1.
One daemon serves the whole module (its start-up compiles/loads the pipeline once).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from daemon.broker import Mosquitto, free_port
from helpers import procs
from helpers.clips import H, W, synthetic_frames
from helpers.run_daemon import (
    REPO,
    DaemonProcess,
    Subscriber,
    assert_balanced,
    base_sections,
    tiny_model,  # noqa: F401 (fixture)
    write_config,
)
from helpers.whip import TOKEN, WhipClient, request

pytestmark = pytest.mark.e2e

START_TIMEOUT = 600  # first run compiles Jittor kernels
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


# ---- fixtures ---------------------------------------------------------------------------------------------
class Running:
    def __init__(self, daemon: DaemonProcess, http_port: int, broker: Mosquitto, sub: Subscriber) -> None:
        self.daemon, self.http_port, self.broker, self.sub = daemon, http_port, broker, sub
        self.base = f"http://127.0.0.1:{http_port}"

    def health(self) -> dict[str, Any]:
        req = urllib.request.Request(self.base + "/healthz", headers={"Authorization": f"Bearer {TOKEN}"})
        try:
            with urllib.request.urlopen(req, timeout=20) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read())
        except (urllib.error.URLError, OSError):  # not listening yet
            return {}

    def cam(self, key: str) -> Any:
        """A counter of the webrtc source from /healthz (0 while unavailable)."""
        return self.health().get("sources", {}).get("cam", {}).get(key, 0)

    def wait(self, pred: Any, timeout: float, what: str) -> None:
        procs.wait_for(pred, timeout, what, self.daemon)


@pytest.fixture(scope="module")
def running(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("webrtc-daemon")
    http_port = free_port()
    with Mosquitto(tmp / "broker") as broker:
        sections = base_sections(tiny_model, mqtt_port=broker.port, http_port=http_port)
        sections["http"]["token"] = TOKEN
        sections["overload"] = {"policy": "skip", "max_queued_windows": 1}
        sections["daemon"]["shutdown_grace_s"] = 5.0  # frames cut off at the end count as dropped{shutdown}
        # "clip" is a file source (WHIP must answer 404 for it) that fails at run time: the file exists (the
        # config check requires it) but is not a video
        (tmp / "broken.mp4").write_bytes(b"not a video")
        cfg = write_config(tmp / "cfg.toml", sections, {"cam": {"type": "webrtc"}, "clip": {
            "type": "file", "path": str(tmp / "broken.mp4")}})
        sub = Subscriber(broker.port, source="cam")
        d = DaemonProcess(cfg, tmp, exit_when_done=False)
        r = Running(d, http_port, broker, sub)
        try:
            r.wait(lambda: r.health().get("state") == "ready", START_TIMEOUT, "ready")
            yield r
            d.terminate(signal.SIGTERM)
            rc = d.wait(120)
            log = d.log_text()
            assert rc == 0, log[-4000:]  # SIGTERM mid-window: a clean stop, whatever children were killed
            assert "Caught SIGCHLD" not in log, log[-4000:]
            assert_balanced(d.summary(), "cam")
        finally:
            d.kill()
            sub.close()


# ---- aiortc client ----------------------------------------------------------------------------------------
async def _until(pred: Any, timeout: float, what: str, r: Running) -> None:
    """Poll a blocking predicate in a thread (this loop keeps serving the aiortc client meanwhile)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if await asyncio.to_thread(pred):
            return
        if r.daemon.proc.poll() is not None:
            pytest.fail(f"daemon exited while waiting for {what}:\n{r.daemon.log_text()[-4000:]}")
        await asyncio.sleep(0.1)
    pytest.fail(f"timeout waiting for {what}:\n{r.daemon.log_text()[-4000:]}")


# ---- tests ------------------------------------------------------------------------------------------------
def test_aiortc_whip_frames_reach_mqtt(running: Running) -> None:
    r = running
    # a different size than the processing size (64x128): the ingest resizes like the other ingests
    frames = synthetic_frames(30, 96, 192, seed=3)

    async def main() -> None:
        in_before = await asyncio.to_thread(r.cam, "frames_in")
        n_before = len(r.sub.frames)
        client = WhipClient(r.base, "cam", frames)
        assert await client.start() == 201
        assert client.location is not None and client.location.startswith("/whip/cam/")
        # one session per source: a second publisher is refused while the first is live
        second = WhipClient(r.base, "cam", frames)
        assert await second.start() == 409
        await second.stop(delete=False)
        await _until(lambda: r.cam("frames_in") >= in_before + 16, 60,
                     "WHIP frames at the source", r)
        assert await client.stop() == 200
        # the first window (8 frames, overlap 2) makes 6 frames final; it may take long on a loaded CPU
        await _until(lambda: len(r.sub.frames) >= n_before + 6, 600, "results of WHIP frames on MQTT", r)
        h = (await asyncio.to_thread(r.health))["sources"]["cam"]
        assert h["frames_out"] >= 6, h
        # after DELETE the source waits for the next session; a new one is accepted and delivers frames
        in_before = h["frames_in"]
        again = WhipClient(r.base, "cam", frames)
        assert await again.start() == 201
        await _until(lambda: r.cam("frames_in") >= in_before + 10, 60,
                     "frames of a second session", r)
        assert await again.stop() == 200

    asyncio.run(main())
    got = [f for f in r.sub.frames if f.source == "cam"]
    assert got, "no MQTT results for the webrtc source"
    f = got[-1]
    assert f.depth is not None and f.depth.shape == (H, W)
    assert np.isfinite(f.depth).all() and (f.depth > 0).any()
    assert f.pts > 1e9  # wall-clock receive time, as for RTSP
    health = r.health()
    assert health["ok"] and health["sources"]["cam"]["state"] == "running", health


def test_whip_errors_are_clean_4xx(running: Running) -> None:
    r = running
    url = r.base + "/whip/cam"
    offer = "v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n"

    async def main() -> None:
        assert (await request("POST", url, body="hello"))[0] == 400
        assert (await request("POST", url, body=offer))[0] == 400  # no ICE/DTLS attributes
        assert (await request("POST", url, body=offer, token=None))[0] == 401
        assert (await request("POST", url, body=offer, token="wrong"))[0] == 403
        assert (await request("POST", url, body=offer, content_type="text/plain"))[0] == 415
        assert (await request("POST", r.base + "/whip/nope", body=offer))[0] == 404
        assert (await request("POST", r.base + "/whip/clip", body=offer))[0] == 404  # not a webrtc source
        assert (await request("DELETE", url + "/no-such-session"))[0] == 404
        assert (await request("DELETE", url + "/no-such-session", token=None))[0] == 401
        # a good session still works after all that
        client = WhipClient(r.base, "cam", synthetic_frames(4, seed=1))
        assert await client.start() == 201
        assert await client.stop() == 200

    asyncio.run(main())
    health = r.health()
    assert health["ok"] and r.daemon.proc.poll() is None, health
    log_text = r.daemon.log_text()
    assert "Error handling request" not in log_text and "ingest_webrtc.py" not in log_text


# ---- Chromium over the DevTools protocol ------------------------------------------------------------------
class Cdp:
    """A minimal Chrome DevTools Protocol client for one page target (aiohttp websocket)."""

    def __init__(self, ws: Any) -> None:
        self.ws, self._id = ws, 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        my_id = self._id
        await self.ws.send_json({"id": my_id, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json(timeout=60)
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def eval(self, expr: str) -> Any:
        res = await self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expr}: {res['exceptionDetails']}")
        return res["result"].get("value")


def _start_chromium(user_dir: str, port: int) -> subprocess.Popen[bytes]:
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--use-fake-device-for-media-stream",
            "--use-fake-ui-for-media-stream", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", f"--user-data-dir={user_dir}",
            f"--remote-debugging-port={port}",
            "--remote-allow-origins=*", "--disable-background-timer-throttling",
            "--disable-renderer-backgrounding", "--disable-backgrounding-occluded-windows",
            "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--window-size=1280,720",
            "about:blank"]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def _open_page(http: Any, port: int, url: str) -> Any:
    end = time.monotonic() + 30
    while True:
        try:
            async with http.put(f"http://127.0.0.1:{port}/json/new?{url}") as resp:
                target = await resp.json(content_type=None)
                break
        except OSError:
            if time.monotonic() > end:
                raise
            await asyncio.sleep(0.2)
    return await http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=64 * 1024 * 1024)


def _region_std(png: bytes) -> tuple[float, Any]:
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    return float(np.asarray(img, np.float32).std()), img


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium not installed")
def test_chromium_publishes_camera_and_viewer_shows_depth(running: Running) -> None:
    r = running
    port = free_port()

    async def main() -> None:
        import aiohttp

        user_dir = tempfile.mkdtemp(prefix="geometryd-chromium-")
        browser = _start_chromium(user_dir, port)
        try:
            async with aiohttp.ClientSession() as http:
                # the browser's frames get source frame indices >= first_index
                first_index = await asyncio.to_thread(r.cam, "frames_in")
                pub_ws = await _open_page(http, port, f"{r.base}/viewer/publish/cam?access_token={TOKEN}")
                pub = Cdp(pub_ws)
                await pub.call("Runtime.enable")
                await _until_js(pub, "document.readyState === 'complete' && !!window.publishState", 30)
                await pub.eval("document.getElementById('size').value = '320x180'")
                await pub.eval("document.getElementById('start').click()")
                await _until_js(pub, "window.publishState.state === 'connected' || "
                                "!!window.publishState.error", 30)
                assert await pub.eval("window.publishState.state") == "connected", \
                    await pub.eval("document.getElementById('log').textContent")
                await _until(lambda: r.cam("frames_in") >= first_index + 8, 60, "the browser's frames", r)

                view_ws = await _open_page(http, port, f"{r.base}/viewer/cam?access_token={TOKEN}")
                view = Cdp(view_ws)
                await view.call("Runtime.enable")
                # results of the browser's frames (a window takes minutes on a loaded 2-core CPU)
                await _until_js(view, f"window.viewerStats.lastFrameIndex >= {first_index}", 900)
                stats = await view.eval("JSON.stringify(window.viewerStats)")
                assert json.loads(stats)["webgl"], stats
                await view.eval("document.getElementById('overlay').style.visibility = 'hidden'")
                rect = json.loads(await view.eval(
                    "JSON.stringify(document.getElementById('depth').getBoundingClientRect())"))
                clip = {k: rect[k] for k in ("x", "y", "width", "height")}
                shot = await view.call("Page.captureScreenshot", format="png", clip={**clip, "scale": 1})
                std, _ = _region_std(base64.b64decode(shot["data"]))
                assert std > 10.0, (std, stats)  # a blank or flat canvas has std ~0
                await view.eval("document.getElementById('overlay').style.visibility = 'visible'")
                full = base64.b64decode((await view.call("Page.captureScreenshot", format="png"))["data"])
                if os.environ.get("GEOMETRYD_SAVE_VIEWER_PNG") == "1":
                    (REPO / "docs").mkdir(exist_ok=True)
                    (REPO / "docs" / "viewer.png").write_bytes(full)
                await pub.eval("document.getElementById('stop').click()")
                await asyncio.sleep(0.5)
                await pub_ws.close()
                await view_ws.close()
        finally:
            browser.terminate()
            try:
                browser.wait(10)
            except subprocess.TimeoutExpired:
                browser.kill()
            shutil.rmtree(user_dir, ignore_errors=True)

    asyncio.run(main())
    assert r.health()["ok"]


async def _until_js(page: Cdp, expr: str, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if await page.eval(expr):
                return
        except RuntimeError:
            pass
        await asyncio.sleep(0.2)
    raise AssertionError(f"timeout waiting for {expr!r}")

