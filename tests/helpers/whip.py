"""A WHIP publisher for tests: an aiortc client that POSTs an offer with a numpy track, and plain requests."""

from __future__ import annotations

from typing import Any

import numpy as np

from daemon.stages.ingest_webrtc import limit_ice_addresses

TOKEN = "s3cret-token"


def _synthetic_track(frames: np.ndarray) -> Any:
    import av
    from aiortc import VideoStreamTrack

    class SyntheticTrack(VideoStreamTrack):
        """numpy frames at 30 fps (VideoStreamTrack.next_timestamp paces them)."""

        def __init__(self) -> None:
            super().__init__()
            self.sent = 0

        async def recv(self) -> av.VideoFrame:
            pts, time_base = await self.next_timestamp()
            frame = av.VideoFrame.from_ndarray(frames[self.sent % len(frames)], format="rgb24")
            frame.pts, frame.time_base = pts, time_base
            self.sent += 1
            return frame

    return SyntheticTrack()


class WhipClient:
    """An aiortc publisher: POST the offer, apply the answer, DELETE at the end."""

    def __init__(self, base: str, source: str, frames: np.ndarray, token: str = TOKEN) -> None:
        self.url = f"{base}/whip/{source}"
        self.base, self.frames, self.token = base, frames, token
        self.pc: Any = None
        self.track: Any = None
        self.location: str | None = None

    async def start(self) -> int:
        import aiohttp
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

        limit_ice_addresses("127.0.0.1")
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.track = _synthetic_track(self.frames)
        self.pc.addTrack(self.track)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        headers = {"Content-Type": "application/sdp", "Authorization": f"Bearer {self.token}"}
        async with aiohttp.ClientSession() as http:
            async with http.post(self.url, data=self.pc.localDescription.sdp, headers=headers) as resp:
                body = await resp.text()
                if resp.status != 201:
                    return resp.status
                assert resp.content_type == "application/sdp"
                self.location = resp.headers["Location"]
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))
        return 201

    async def stop(self, delete: bool = True) -> int | None:
        import aiohttp

        status = None
        if delete and self.location:
            async with aiohttp.ClientSession() as http:
                async with http.delete(self.base + self.location,
                                       headers={"Authorization": f"Bearer {self.token}"}) as resp:
                    status = resp.status
        if self.pc is not None:
            await self.pc.close()
        return status


async def request(method: str, url: str, *, body: str | None = None, token: str | None = TOKEN,
                   content_type: str = "application/sdp") -> tuple[int, str]:
    import aiohttp

    headers = {"Content-Type": content_type}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with aiohttp.ClientSession() as http:
        async with http.request(method, url, data=body, headers=headers) as resp:
            return resp.status, await resp.text()
