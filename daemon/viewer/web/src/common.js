// Helpers shared by the viewer pages.

/** The source name: the last path segment of /viewer/<source> or /viewer/publish/<source>. */
export function sourceFromPath() {
  const parts = location.pathname.split("/").filter(Boolean);
  return decodeURIComponent(parts[parts.length - 1] || "");
}

/** The bearer token passed as ?access_token= (RFC 6750 section 2.3), or "". */
export function tokenFromQuery() {
  return new URLSearchParams(location.search).get("access_token") || "";
}

export function withToken(path, token) {
  return token ? `${path}?access_token=${encodeURIComponent(token)}` : path;
}

/** Decode one binary result message (layout: daemon/viewer/hub.py). */
export function decodeMessage(buf) {
  const view = new DataView(buf);
  const n = view.getUint32(0, true);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buf, 4, n)));
  const base = 4 + n;
  const [jOff, jLen] = header.jpeg;
  const [xOff, count] = header.xyz;
  const [cOff] = header.rgb;
  return {
    header,
    jpeg: new Blob([new Uint8Array(buf, base + jOff, jLen)], { type: "image/jpeg" }),
    xyz: new Float32Array(buf, base + xOff, count * 3),
    rgb: new Uint8Array(buf, base + cOff, count * 3),
  };
}

/** Frames per second over a sliding window of arrival times. */
export class RateMeter {
  constructor(windowMs = 2000) { this.windowMs = windowMs; this.times = []; }
  tick(now = performance.now()) {
    this.times.push(now);
    while (this.times.length && now - this.times[0] > this.windowMs) this.times.shift();
  }
  get fps() {
    if (this.times.length < 2) return 0;
    return (this.times.length - 1) * 1000 / (this.times[this.times.length - 1] - this.times[0]);
  }
}
