// Live viewer: colourised depth (2D canvas) + point cloud (three.js), fed by /viewer/ws/<source>.
import * as THREE from "three";
import { OrbitControls } from "three/examples/jsm/controls/OrbitControls.js";
import { RateMeter, decodeMessage, sourceFromPath, tokenFromQuery, withToken } from "./common.js";

const source = sourceFromPath();
const token = tokenFromQuery();
document.getElementById("title").textContent = source;
document.title = `geometryd: ${source}`;
const conn = document.getElementById("conn");
const overlay = document.getElementById("overlay");
const depthCanvas = document.getElementById("depth");
const depthCtx = depthCanvas.getContext("2d");
const rate = new RateMeter();
window.viewerStats = { frames: 0, lastFrameIndex: -1, fps: 0, latencyMs: null, points: 0, webgl: false,
  tier: null, previews: 0, refined: 0, lastRefinedIndex: -1 };
// What is on screen: the newest frame; a refined frame replaces the preview of the same (or an older
// shown) frame index, a preview never replaces a refined frame of the same index.
let shown = { index: -1, tier: null };

// ---- point cloud --------------------------------------------------------------------------------------
const cloud = makeCloud(document.getElementById("cloud"));

function makeCloud(container) {
  let renderer;
  try {
    renderer = new THREE.WebGLRenderer({ antialias: false, preserveDrawingBuffer: true });
  } catch (err) {
    container.textContent = `WebGL unavailable: ${err.message}`;
    return null;
  }
  window.viewerStats.webgl = true;
  renderer.setPixelRatio(window.devicePixelRatio || 1);
  container.appendChild(renderer.domElement);
  const scene = new THREE.Scene();
  scene.background = new THREE.Color(0x050505);
  const camera = new THREE.PerspectiveCamera(50, 2, 0.01, 1000);
  camera.position.set(0, 0, 0);
  const controls = new OrbitControls(camera, renderer.domElement);
  const geometry = new THREE.BufferGeometry();
  const material = new THREE.PointsMaterial({ size: 2, sizeAttenuation: false, vertexColors: true });
  const points = new THREE.Points(geometry, material);
  // point maps are in camera coordinates (x right, y down, z forward); three.js looks down -z with y up
  points.scale.set(1, -1, -1);
  scene.add(points);
  let framed = false;

  function resize() {
    const w = container.clientWidth, h = container.clientHeight;
    renderer.setSize(w, h, false);
    camera.aspect = w / Math.max(h, 1);
    camera.updateProjectionMatrix();
  }
  new ResizeObserver(resize).observe(container);
  resize();

  function update(xyz, rgb) {
    geometry.setAttribute("position", new THREE.BufferAttribute(new Float32Array(xyz), 3));
    geometry.setAttribute("color", new THREE.BufferAttribute(new Uint8Array(rgb), 3, true));
    geometry.computeBoundingSphere();
    if (!framed && xyz.length) {
      // first frame: aim at the cloud's bounding sphere (in view space: y and z flipped), seen from a bit
      // above and to the side of the source camera, far enough to show all of it
      const sphere = geometry.boundingSphere;
      const c = sphere.center.clone().multiply(points.scale);
      const r = Math.max(sphere.radius, 1e-3);
      const dist = r / Math.sin((camera.fov * Math.PI) / 360) * 1.1;
      controls.target.copy(c);
      camera.position.set(c.x + dist * 0.35, c.y + dist * 0.25, c.z + dist * 0.9);
      camera.near = dist / 100;
      camera.far = dist * 10;
      camera.updateProjectionMatrix();
      controls.update();
      framed = true;
    }
  }

  renderer.setAnimationLoop(() => { controls.update(); renderer.render(scene, camera); });
  return { update };
}

// ---- websocket ------------------------------------------------------------------------------------------
function connect() {
  const proto = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${proto}://${location.host}${withToken(`/viewer/ws/${encodeURIComponent(source)}`, token)}`);
  ws.binaryType = "arraybuffer";
  ws.onopen = () => { conn.textContent = "live"; conn.className = "pill ok"; };
  ws.onclose = () => {
    conn.textContent = "disconnected (retrying)"; conn.className = "pill bad";
    setTimeout(connect, 1000);
  };
  ws.onmessage = async (ev) => {
    const msg = decodeMessage(ev.data);
    const h = msg.header;
    const tier = h.tier || "refined";
    const s = window.viewerStats;
    if (tier === "refined") { s.refined += 1; s.lastRefinedIndex = h.frame_index; } else { s.previews += 1; }
    const newer = h.frame_index > shown.index;
    const swap = h.frame_index === shown.index && tier === "refined" && shown.tier !== "refined";
    if (!newer && !swap) return;
    shown = { index: h.frame_index, tier };
    const bitmap = await createImageBitmap(msg.jpeg);
    if (depthCanvas.width !== h.width || depthCanvas.height !== h.height) {
      depthCanvas.width = h.width;
      depthCanvas.height = h.height;
    }
    depthCtx.drawImage(bitmap, 0, 0);
    bitmap.close();
    if (cloud) cloud.update(msg.xyz, msg.rgb);
    rate.tick();
    s.tier = tier;
    s.frames += 1; s.lastFrameIndex = h.frame_index; s.fps = rate.fps; s.latencyMs = h.latency_ms;
    s.points = msg.xyz.length / 3;
    const lat = h.latency_ms == null ? "n/a" : `${h.latency_ms.toFixed(0)} ms`;
    overlay.textContent =
      `${s.fps.toFixed(1)} fps   latency ${lat}   ${tier}\nframe ${h.frame_index}  window ${h.window_id}  ` +
      `${h.width}x${h.height}  ${s.points} pts   refined up to ${s.lastRefinedIndex}`;
  };
}
connect();
