// Publish the browser camera to the daemon through WHIP (non-trickle: the offer carries every candidate).
import { sourceFromPath, tokenFromQuery, withToken } from "./common.js";

const source = sourceFromPath();
const $ = (id) => document.getElementById(id);
$("title").textContent = source;
$("token").value = tokenFromQuery();
$("viewlink").href = withToken(`/viewer/${encodeURIComponent(source)}`, tokenFromQuery());
const status = $("status");
let pc = null;
let location_ = null;
let stream = null;
window.publishState = { state: "idle", error: null };

function setStatus(text, cls = "") {
  status.textContent = text;
  status.className = `pill ${cls}`;
  window.publishState.state = text;
}

function log(line) {
  $("log").textContent += `${new Date().toISOString().slice(11, 19)} ${line}\n`;
}

function authHeaders() {
  const t = $("token").value.trim();
  return t ? { Authorization: `Bearer ${t}` } : {};
}

function waitIceComplete(peer, timeoutMs = 3000) {
  if (peer.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { peer.removeEventListener("icegatheringstatechange", check); resolve(); };
    const check = () => { if (peer.iceGatheringState === "complete") done(); };
    peer.addEventListener("icegatheringstatechange", check);
    setTimeout(done, timeoutMs);
  });
}

async function start() {
  $("start").disabled = true;
  try {
    const [w, h] = $("size").value.split("x").map(Number);
    setStatus("camera…");
    stream = await navigator.mediaDevices.getUserMedia({ video: { width: w, height: h }, audio: false });
    $("preview").srcObject = stream;
    pc = new RTCPeerConnection({ iceServers: [] });
    for (const track of stream.getVideoTracks()) pc.addTransceiver(track, { direction: "sendonly", streams: [stream] });
    pc.onconnectionstatechange = () => {
      log(`connection ${pc.connectionState}`);
      if (pc.connectionState === "connected") setStatus("connected", "ok");
      if (pc.connectionState === "failed") setStatus("failed", "bad");
    };
    await pc.setLocalDescription(await pc.createOffer());
    await waitIceComplete(pc);
    setStatus("offering…");
    const res = await fetch(`/whip/${encodeURIComponent(source)}`, {
      method: "POST", headers: { "Content-Type": "application/sdp", ...authHeaders() }, body: pc.localDescription.sdp,
    });
    const body = await res.text();
    if (res.status !== 201) throw new Error(`WHIP ${res.status}: ${body.trim()}`);
    location_ = res.headers.get("Location");
    log(`session ${location_}`);
    await pc.setRemoteDescription({ type: "answer", sdp: body });
    $("stop").disabled = false;
  } catch (err) {
    window.publishState.error = String(err.message || err);
    log(`error: ${window.publishState.error}`);
    setStatus("error", "bad");
    await stop(false);
  }
}

async function stop(sendDelete = true) {
  if (sendDelete && location_) {
    // keepalive: the DELETE still goes out when the page is being closed
    try { await fetch(location_, { method: "DELETE", headers: authHeaders(), keepalive: true }); } catch (err) { log(String(err)); }
  }
  location_ = null;
  if (pc) { pc.close(); pc = null; }
  if (stream) { stream.getTracks().forEach((t) => t.stop()); stream = null; }
  $("start").disabled = false;
  $("stop").disabled = true;
  if (sendDelete) setStatus("stopped");
}

$("start").addEventListener("click", start);
$("stop").addEventListener("click", () => stop(true));
window.addEventListener("pagehide", () => { if (location_) stop(true); });
if (new URLSearchParams(location.search).get("autostart") === "1") start();
