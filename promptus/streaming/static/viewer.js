// Promptus viewer: pick a clip; the server regenerates it and sends the frames over WebRTC,
// or over WebSocket (JPEG on a canvas) when WebRTC cannot connect. State for tests: window.promptusViewer.
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const state = window.promptusViewer = {
  clip: null, transport: "idle", codec: null, fallbackReason: null, framesShown: 0, fps: 0,
  stats: null, statsUpdates: 0, rtt: 0, jitterMs: 0, videoKbps: null, error: null, ended: false, admission: null,
  device: null, webrtcFailedAfterMs: null,
};
const RTC_CONNECT_MS = 3000;  // no WebRTC connection by then: fall back to WebSocket
const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
let session = null;  // {close()}
const history = [];  // [{prompt, video, h264}]

function clipPath(name) { return name.split("/").map(encodeURIComponent).join("/"); }
function escapeHtml(t) { return String(t).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]); }
function fmt(x, digits = 0) { return x === null || x === undefined || Number.isNaN(x) ? "–" : Number(x).toFixed(digits); }

async function loadClips() {
  const list = $("clips");
  try {
    const r = await fetch("/api/clips");
    const data = await r.json();
    list.innerHTML = "";
    for (const c of data.clips) {
      const li = document.createElement("li");
      const b = document.createElement("button");
      b.dataset.clip = c.name;
      b.innerHTML = `${c.name}<small>${c.error ? c.error : `${c.frames} frames · ${c.width}×${c.height} · ${fmt(c.kbps)} kbit/s`}</small>`;
      b.disabled = !!c.error;
      b.onclick = () => play(c);
      li.appendChild(b);
      list.appendChild(li);
    }
    if (!data.clips.length) list.innerHTML = '<li class="muted">no .promptus files here</li>';
    const wanted = params.get("clip");
    const pick = data.clips.find((c) => c.name === wanted);
    if (pick) play(pick);
  } catch (e) {
    list.innerHTML = `<li class="muted">cannot list clips: ${e}</li>`;
  }
}

async function pollStatus() {
  try {
    const s = await (await fetch("/api/status")).json();
    const kinds = new Set((s.devices || []).map((d) => String(d.device || "").startsWith("cuda") ? "GPU"
                                                     : d.device === "cpu" ? "CPU" : "server"));
    state.device = kinds.size === 1 ? [...kinds][0] : "server";
    $("server-status").textContent = s.viewer
      ? `${plural(s.streams, "stream")} decoding on ${s.devices.length > 1 ? `${s.devices.length} devices` : `the ${state.device}`}` +
        (s.capacity ? ` · capacity ${fmt(s.capacity)} frames/s` : "") + ` · WebRTC ${s.webrtc}`
      : "this server streams prompts only (no model loaded)";
    $("device-label").textContent = `decoding on the ${state.device}`;
  } catch (e) { $("server-status").textContent = "server unreachable"; }
}

function setTransport(kind, codec) {
  state.transport = kind; state.codec = codec;
  const t = $("transport");
  t.textContent = kind === "webrtc" ? `WebRTC · ${codec || "?"}` : kind === "websocket" ? "WebSocket · JPEG" : kind;
  t.className = `badge ${kind}`;
  if (state.fallbackReason && kind === "websocket") t.title = `WebRTC did not connect: ${state.fallbackReason}`;
  $("rtc-video").hidden = kind !== "webrtc";
  $("ws-canvas").hidden = kind !== "websocket";
  $("placeholder").hidden = kind === "webrtc" || kind === "websocket";
}

function notice(html) {
  const n = $("notice");
  n.hidden = !html;
  n.innerHTML = html || "";
}

function showOriginal(clip, rate) {
  const panel = $("original-panel"), v = $("original-video");
  if (!clip.original) { panel.hidden = true; v.removeAttribute("src"); return null; }
  panel.hidden = false;
  $("original-codec").textContent = clip.original_codec || "";
  v.src = `/files/${clipPath(clip.original)}`;
  v.playbackRate = rate / clip.fps;
  return v;
}

function updateStats(s) {
  const ended = s.frames >= s.frame_count;
  if (ended && state.ended && state.stats) return;  // the clip is over: keep the numbers it ended with
  if (ended) {
    state.ended = true;
    // The window's rates fall to 0 once the last prompt is sent: show the clip's own average instead.
    s = { ...s, prompt_kbps: s.prompt_kbps || s.clip_kbps };
    $("stat-prompt-kbps").title = "the clip's average (the stream has ended)";
  }
  state.stats = s; state.statsUpdates += 1;
  const extraLatency = 1000 * state.rtt / 2 + state.jitterMs;
  $("stat-prompt-kbps").textContent = fmt(s.prompt_kbps);
  $("stat-h264-kbps").textContent = fmt(s.h264_kbps);
  $("stat-h264-kbps").title = s.h264_kbps ? `the original file (${s.original_codec})` : "no original next to this clip";
  let video = state.transport === "webrtc" ? state.videoKbps : s.video_kbps;
  if (ended && !video) video = history.length ? Math.max(...history.map((p) => p.video)) : video;
  $("stat-video-kbps").textContent = fmt(video);
  $("stat-latency").textContent = s.latency_ms === null ? "–" : fmt(s.latency_ms + extraLatency);
  $("stat-frame").textContent = fmt(s.frames);
  $("stat-frames-total").textContent = `of ${s.frame_count}`;
  $("stat-streams").textContent = s.streams;
  $("stat-capacity").textContent = `stream${s.streams === 1 ? "" : "s"}` + (s.capacity ? ` · ${fmt(s.capacity)} fps max` : "");
  history.push({ prompt: s.prompt_kbps, video: video || 0, h264: s.h264_kbps || 0 });
  if (history.length > 120) history.shift();
  drawChart();
}

function drawChart() {
  const c = $("rate-chart"), g = c.getContext("2d");
  const w = c.width, h = c.height;
  g.clearRect(0, 0, w, h);
  const top = Math.max(1, ...history.map((p) => Math.max(p.prompt, p.video, p.h264))) * 1.15;
  const axis = 78;  // the labels' column on the left; the lines start right of it
  g.strokeStyle = "#263040"; g.fillStyle = "#8b96a3"; g.font = "11px sans-serif"; g.textAlign = "right";
  for (const f of [0.25, 0.5, 0.75]) {
    g.beginPath(); g.moveTo(axis, h - f * h); g.lineTo(w, h - f * h); g.stroke();
    g.fillText(`${fmt(f * top)} kbit/s`, axis - 6, h - f * h + 4);
  }
  // A short clip fills the width too: x spans the points there are (up to the last 120).
  const span = Math.max(1, Math.min(119, history.length - 1));
  const line = (key, color) => {
    g.strokeStyle = color; g.lineWidth = 2; g.beginPath();
    history.forEach((p, i) => {
      const x = axis + (i / span) * (w - axis), y = h - (p[key] / top) * h;
      if (i === 0) g.moveTo(x, y); else g.lineTo(x, y);
    });
    g.stroke();
  };
  line("h264", "#c77dff"); line("video", "#ffb347"); line("prompt", "#5fb3ff");
}

// Frames actually presented, counted over one-second windows.
let frameTimes = [];
function countFrame() {
  const now = performance.now();
  state.framesShown += 1;
  frameTimes.push(now);
  while (frameTimes.length && frameTimes[0] < now - 1000) frameTimes.shift();
  state.fps = frameTimes.length;
  $("stat-fps").textContent = fmt(state.fps);
}

function stop() {
  if (session) session.close();
  session = null;
  frameTimes = []; history.length = 0;
  for (const id of ["stat-prompt-kbps"]) $(id).title = "";
  Object.assign(state, { framesShown: 0, fps: 0, stats: null, statsUpdates: 0, ended: false, error: null,
                         fallbackReason: null, admission: null, videoKbps: null, jitterMs: 0, rtt: 0,
                         webrtcFailedAfterMs: null });
}

async function play(clip, opts = {}) {
  stop();
  state.clip = clip.name;
  document.querySelectorAll("#clips button").forEach((b) => b.classList.toggle("active", b.dataset.clip === clip.name));
  notice(null);
  setTransport("connecting…");
  const choice = params.get("transport") || $("transport-choice").value;
  const query = { rate: opts.rate || "", accept_lower: opts.acceptLower ? 1 : 0 };
  const t0 = performance.now();
  if (choice !== "websocket" && window.RTCPeerConnection) {
    try {
      session = await playWebRTC(clip, query);
      return;
    } catch (e) {
      if (e.admission) return admissionNotice(clip, e.admission);
      state.fallbackReason = String(e.message || e);
      state.webrtcFailedAfterMs = Math.round(performance.now() - t0);
      console.warn("WebRTC failed, falling back to WebSocket:", state.fallbackReason);
      if (choice === "webrtc") { state.error = state.fallbackReason; notice(`WebRTC failed: ${state.fallbackReason}`); return; }
      notice(`WebRTC did not connect (${escapeHtml(state.fallbackReason)}): showing the frames over WebSocket ` +
        "instead (JPEG, more bytes to this page). A browser on another machine, or Chromium with " +
        "--allow-loopback-in-peer-connection, usually connects.");
    }
  } else if (choice !== "websocket") {
    state.fallbackReason = "this browser has no WebRTC";
  }
  session = playWebSocket(clip, query);
}

function admissionNotice(clip, adm) {
  state.admission = adm;
  setTransport("refused");
  notice(`The ${state.device || "server"} is busy: ${adm.streams} streams use ${fmt(adm.load)} of ${fmt(adm.capacity)} frames/s. ` +
    (adm.offer > 1 ? `You can watch at ${fmt(adm.offer, 1)} fps (slower than real time) ` +
      `<button id="accept-lower">watch at ${fmt(adm.offer, 1)} fps</button>` : "Try again later."));
  const b = $("accept-lower");
  if (b) b.onclick = () => play(clip, { rate: adm.offer, acceptLower: true });
}

function waitFor(cond, ms, what) {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const tick = () => {
      if (cond()) resolve();
      else if (performance.now() - t0 > ms) reject(new Error(what));
      else setTimeout(tick, 50);
    };
    tick();
  });
}

async function playWebRTC(clip, query) {
  const pc = new RTCPeerConnection();
  let closed = false, statsTimer = null;
  const close = () => { closed = true; clearInterval(statsTimer); pc.close(); };
  try {
    pc.addTransceiver("video", { direction: "recvonly" });
    const channel = pc.createDataChannel("stats");
    channel.onmessage = (ev) => { if (!closed) updateStats(JSON.parse(ev.data)); };
    const video = $("rtc-video");
    pc.ontrack = (ev) => { video.srcObject = ev.streams[0] || new MediaStream([ev.track]); };
    await pc.setLocalDescription(await pc.createOffer());
    await waitFor(() => pc.iceGatheringState === "complete", 3000, "ICE gathering").catch(() => {});
    const r = await fetch(`/api/webrtc/${clipPath(clip.name)}`, {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ sdp: pc.localDescription.sdp, type: pc.localDescription.type, ...query }),
    });
    const answer = await r.json();
    if (!r.ok) {
      const err = new Error(answer.error || `HTTP ${r.status}`);
      err.admission = answer.admission;
      throw err;
    }
    await pc.setRemoteDescription({ sdp: answer.sdp, type: answer.type });
    // The connection state says within seconds whether ICE got through; no need to wait for a frame.
    await new Promise((resolve, reject) => {
      const fail = (why) => { clearTimeout(timer); pc.removeEventListener("connectionstatechange", check); reject(new Error(why)); };
      const check = () => {
        const st = pc.connectionState || pc.iceConnectionState;
        if (st === "connected" || st === "completed") { clearTimeout(timer); pc.removeEventListener("connectionstatechange", check); resolve(); }
        else if (st === "failed" || st === "closed") fail(`the WebRTC connection ${st}`);
      };
      const timer = setTimeout(() => fail(`no WebRTC connection within ${RTC_CONNECT_MS / 1000} s (ICE could not connect)`),
                               RTC_CONNECT_MS);
      pc.addEventListener("connectionstatechange", check);
      check();
    });
    const onFrame = () => { if (closed) return; countFrame(); video.requestVideoFrameCallback(onFrame); };
    if (video.requestVideoFrameCallback) video.requestVideoFrameCallback(onFrame);
    video.play().catch(() => {});
    await waitFor(() => state.framesShown > 0, 15000, "connected, but no video frame within 15 s");
    setTransport("webrtc", answer.codec);
    const orig = showOriginal(clip, answer.admission.rate);
    if (orig) orig.play().catch(() => {});
    let lastBytes = null, lastT = null, lastDelay = 0, lastEmitted = 0;
    statsTimer = setInterval(async () => {
      const report = await pc.getStats();
      report.forEach((s) => {
        if (s.type === "inbound-rtp" && s.kind === "video") {
          if (lastBytes !== null) state.videoKbps = 8 * (s.bytesReceived - lastBytes) / (s.timestamp - lastT);
          lastBytes = s.bytesReceived; lastT = s.timestamp;
          const emitted = (s.jitterBufferEmittedCount || 0) - lastEmitted;  // this second's frames only
          if (emitted > 0) state.jitterMs = 1000 * (s.jitterBufferDelay - lastDelay) / emitted;
          lastDelay = s.jitterBufferDelay || 0; lastEmitted = s.jitterBufferEmittedCount || 0;
          const codec = s.codecId && report.get(s.codecId);
          if (codec) setTransport("webrtc", codec.mimeType.replace("video/", ""));
        }
        if (s.type === "candidate-pair" && s.nominated && s.currentRoundTripTime !== undefined) state.rtt = s.currentRoundTripTime;
      });
    }, 1000);
    video.onended = () => { state.ended = true; };
    return { close };
  } catch (e) {
    close();
    throw e;
  }
}

function playWebSocket(clip, query) {
  const proto = location.protocol === "https:" ? "wss" : "ws";
  const qs = new URLSearchParams(query).toString();
  const ws = new WebSocket(`${proto}://${location.host}/ws/view/${clipPath(clip.name)}?${qs}`);
  ws.binaryType = "arraybuffer";
  const canvas = $("ws-canvas"), g = canvas.getContext("2d");
  let pinger = null, orig = null, drawing = Promise.resolve();
  ws.onopen = () => {
    pinger = setInterval(() => ws.readyState === 1 && ws.send(JSON.stringify({ type: "ping", t: performance.now() })), 1000);
  };
  ws.onmessage = (ev) => {
    if (typeof ev.data === "string") {
      const m = JSON.parse(ev.data);
      if (m.type === "hello") {
        setTransport("websocket", "jpeg");
        orig = showOriginal(clip, m.admission.rate);
        if (!m.admission.realtime) notice(`Playing at ${fmt(m.admission.rate, 1)} fps: ${m.admission.reason}`);
      } else if (m.type === "stats") updateStats(m);
      else if (m.type === "pong") state.rtt = (performance.now() - m.t) / 1000;
      else if (m.type === "admission") admissionNotice(clip, m);
      else if (m.type === "error") { if (!state.admission) notice(m.message); state.error = m.message; }
      else if (m.type === "end") state.ended = true;
      return;
    }
    const blob = new Blob([new Uint8Array(ev.data, 8)], { type: "image/jpeg" });
    drawing = drawing.then(async () => {
      const img = await createImageBitmap(blob);
      if (canvas.width !== img.width) { canvas.width = img.width; canvas.height = img.height; }
      g.drawImage(img, 0, 0);
      countFrame();
      if (orig && orig.paused && state.framesShown === 1) orig.play().catch(() => {});
    });
  };
  ws.onclose = () => { clearInterval(pinger); };
  return { close: () => { clearInterval(pinger); ws.close(); } };
}

$("transport-choice").value = params.get("transport") || "auto";
loadClips();
pollStatus();
setInterval(pollStatus, 2000);
