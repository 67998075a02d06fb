// Student screen stream: whole-screen capture -> canvas -> JPEG -> binary WebSocket frames (proctor/protocol.py).
// Plain ES module, no dependencies. The student page and the end-to-end test both use it as it is.

export const PROTOCOL_VERSION = 1;
export const HEADER_SIZE = 16;
export const FLAG_EVIDENCE = 0x01; // header flag: the full-size copy of an earlier frame, asked for by the server
// Frames kept at full size for evidence_request: an alert opens on a frame one answer ago at most.
const EVIDENCE_KEEP = 3;
const MAX_BUFFERED_BYTES = 2 * 1024 * 1024; // skip frames rather than queue them behind a slow link
const BACKOFF_MIN_MS = 1000;
const BACKOFF_MAX_MS = 30000;
// Close codes after which reconnecting would be wrong (protocol.py).
const CLOSE_EXAM_ENDED = 4000;
const CLOSE_REPLACED = 4001;
const CLOSE_ACCOUNT_DEACTIVATED = 4003;
const CLOSE_PASSWORD_RESET = 4004;
const CLOSE_LOGGED_OUT = 4005;

/** Refusal of a share that is not a whole screen; `message` explains it to the student. */
export class NotWholeScreenError extends Error {
  constructor(surface) {
    super(surface === "browser"
      ? "You shared a browser tab. This exam needs your entire screen: press \"Share screen\" again and choose \"Entire screen\"."
      : "You shared a single window. This exam needs your entire screen: press \"Share screen\" again and choose \"Entire screen\".");
    this.name = "NotWholeScreenError";
    this.surface = surface;
  }
}

/** The 16-byte frame header: version u8, flags u8, 2 reserved bytes, seq u32, capture time ms f64, big-endian. */
export function frameHeader(seq, captureMs, flags = 0) {
  const header = new ArrayBuffer(HEADER_SIZE);
  const view = new DataView(header);
  view.setUint8(0, PROTOCOL_VERSION);
  view.setUint8(1, flags);
  view.setUint32(4, seq >>> 0, false);
  view.setFloat64(8, captureMs, false);
  return header;
}

/** Size to scale a width x height screen to so it is at most maxWidth wide, keeping the aspect ratio. */
export function scaledSize(width, height, maxWidth) {
  if (!width || !height) return [0, 0];
  const w = Math.min(width, maxWidth);
  return [Math.round(w), Math.max(1, Math.round(height * w / width))];
}

/**
 * The canvas's 2D context, set to scale down with a filter. Chromium's default ("low") point-samples a bitmap:
 * a screen two or three times the frame width comes out with text in broken stripes, unlike the filtered
 * frames the heads are trained on (decode.page_jpeg on the server).
 */
export function smoothContext(canvas) {
  const ctx = canvas.getContext("2d", { alpha: false });
  ctx.imageSmoothingEnabled = true;
  ctx.imageSmoothingQuality = "high";
  return ctx;
}

/** What the page knows of the displays: Window Management API's screen.isExtended where supported. */
export function displayInfo() {
  const extended = typeof screen.isExtended === "boolean" ? screen.isExtended : null;
  return { extended, displays: extended ? 2 : 1 };
}

export class ScreenStreamer {
  /**
   * @param {object} opts
   * @param {string} opts.url  WebSocket URL (ws:// or wss://) of /ws/exams/{id}/stream
   * @param {(state: string, detail: string) => void} [opts.onStatus] idle|connecting|sharing|paused|reconnecting|stopped|ended|error
   * @param {HTMLVideoElement} [opts.video] element to play the capture in (a hidden one is made otherwise)
   */
  constructor({ url, onStatus = () => {}, video = null }) {
    this.url = url;
    this.onStatus = onStatus;
    this.video = video || document.createElement("video");
    this.video.muted = true;
    this.video.playsInline = true;
    this.canvas = document.createElement("canvas");
    this.config = { fps: 0.5, max_width: 640, evidence_max_width: 1920, jpeg_quality: 0.7, heartbeat_s: 5 };
    this.seq = 0;
    this.stats = { framesSent: 0, bytesSent: 0, framesSkipped: 0, acks: 0, reconnects: 0, lastError: null,
      evidenceSent: 0, evidenceMissing: 0 };
    // The last few captured frames at full size, by seq, for the server's evidence_request.
    this._recent = [];
    this.stream = null;
    this.track = null;
    this.ws = null;
    this.state = "idle";
    this._backoff = BACKOFF_MIN_MS;
    this._captureTimer = null;
    this._heartbeatTimer = null;
    this._reconnectTimer = null;
    this._encoding = false;
    this._closedForGood = false;
  }

  _setState(state, detail = "") {
    this.state = state;
    this.onStatus(state, detail);
  }

  /** Ask for the whole screen, refuse anything else, then connect and stream. */
  async start() {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getDisplayMedia) {
      throw new Error("This browser cannot share the screen here. Use a current Chromium, Chrome, Edge or Firefox, "
        + "and open the page over https (or on localhost).");
    }
    const stream = await navigator.mediaDevices.getDisplayMedia({
      video: { displaySurface: "monitor", frameRate: { max: 5 } },
      audio: false,
      monitorTypeSurfaces: "include",
      selfBrowserSurface: "exclude",
      surfaceSwitching: "exclude",
    });
    const track = stream.getVideoTracks()[0];
    const surface = track ? (track.getSettings().displaySurface || null) : null;
    if (!track || (surface !== null && surface !== "monitor")) {
      stream.getTracks().forEach((t) => t.stop());
      throw new NotWholeScreenError(surface || "window");
    }
    this.stream = stream;
    this.track = track;
    this.surface = surface;
    track.addEventListener("ended", () => this._sharingStopped());
    track.addEventListener("mute", () => { if (this.state === "sharing") this._setState("paused", "The screen picture is paused (screen locked or asleep?)."); });
    track.addEventListener("unmute", () => { if (this.state === "paused") this._setState("sharing"); });
    this.video.srcObject = stream;
    this.video.classList.add("on");
    await this.video.play().catch(() => {});
    this._closedForGood = false;
    this._connect();
  }

  /** Stop sharing on purpose (button or page close). */
  stop() {
    this._closedForGood = true;
    this._send({ type: "sharing", state: "stopped" });
    this._teardownCapture();
    if (this.ws) this.ws.close(1000, "student stopped sharing");
    this._setState("stopped", "You stopped sharing your screen.");
  }

  _sharingStopped() {
    // The browser's own "Stop sharing" bar, or the shared display went away.
    this._send({ type: "sharing", state: "stopped" });
    this._teardownCapture();
    this._closedForGood = true;
    if (this.ws) this.ws.close(1000, "sharing stopped");
    this._setState("stopped", "Screen sharing stopped. Your teacher sees that you are not sharing: press \"Share screen\" again.");
  }

  _teardownCapture() {
    clearTimeout(this._captureTimer);
    clearInterval(this._heartbeatTimer);
    clearTimeout(this._reconnectTimer);
    this._captureTimer = this._heartbeatTimer = this._reconnectTimer = null;
    this._forgetRecent(0);
    if (this.stream) this.stream.getTracks().forEach((t) => t.stop());
    this.stream = this.track = null;
    this.video.srcObject = null;
    this.video.classList.remove("on");
  }

  _connect() {
    this._setState(this.stats.reconnects ? "reconnecting" : "connecting", "Connecting to the server…");
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch (err) {
      this.stats.lastError = String(err);
      this._scheduleReconnect();
      return;
    }
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    ws.addEventListener("open", () => {
      const { extended, displays } = displayInfo();
      const settings = this.track ? this.track.getSettings() : {};
      this._send({
        type: "hello",
        screen: { width: settings.width || screen.width, height: settings.height || screen.height },
        displays, extended, surface: this.surface, client: navigator.userAgent.slice(0, 200),
      });
      this._send({ type: "sharing", state: "started" });
      this._startHeartbeat();
    });
    ws.addEventListener("message", (event) => this._onMessage(event));
    ws.addEventListener("close", (event) => this._onClose(event));
    ws.addEventListener("error", () => { this.stats.lastError = "websocket error"; });
  }

  _onMessage(event) {
    if (typeof event.data !== "string") return;
    let msg;
    try { msg = JSON.parse(event.data); } catch (err) { return; }
    if (msg.type === "config") {
      this.config = { ...this.config, ...msg };
      this._backoff = BACKOFF_MIN_MS;
      this._startHeartbeat();
      if (this.track) {
        this._setState(this.track.muted ? "paused" : "sharing");
        this._scheduleCapture(0);
      }
    } else if (msg.type === "evidence_request") {
      this.sendEvidence(msg.seq).catch((err) => { this.stats.lastError = String(err); });
    } else if (msg.type === "ack") {
      // Frame msg.seq was judged; the judgement itself goes to the teachers only.
      this.stats.acks += 1;
    } else if (msg.type === "error") {
      this.stats.lastError = `${msg.code}: ${msg.message}`;
      if (msg.code === "not_whole_screen") {
        this._closedForGood = true;
        this._teardownCapture();
        this._setState("error", new NotWholeScreenError("window").message);
      }
    }
  }

  _onClose(event) {
    clearTimeout(this._captureTimer);
    clearInterval(this._heartbeatTimer);
    this._captureTimer = this._heartbeatTimer = null;
    if (this._closedForGood) return;
    if (event.code === CLOSE_EXAM_ENDED) {
      this._closedForGood = true;
      this._teardownCapture();
      this._setState("ended", "The exam has ended. Thank you; you can close this page.");
      return;
    }
    if (event.code === CLOSE_REPLACED) {
      this._closedForGood = true;
      this._teardownCapture();
      this._setState("error", "This exam was opened in another tab or on another computer; this page stopped sharing.");
      return;
    }
    if (event.code === CLOSE_ACCOUNT_DEACTIVATED) {
      // Reconnecting would only be refused: the account cannot log in any more.
      this._closedForGood = true;
      this._teardownCapture();
      this._setState("error", "Your account was deactivated; this page stopped sharing. Ask your teacher.");
      return;
    }
    if (event.code === CLOSE_PASSWORD_RESET) {
      // This page's login ended with the old password: reconnecting would only be refused.
      this._closedForGood = true;
      this._teardownCapture();
      this._setState("error", "Your password was reset; this page stopped sharing. Log in again with the new password.");
      return;
    }
    if (event.code === CLOSE_LOGGED_OUT) {
      // The account logged out (in another tab or on another computer): this page's login ended with it.
      this._closedForGood = true;
      this._teardownCapture();
      this._setState("error", "You logged out; this page stopped sharing. Log in again to go on.");
      return;
    }
    this._scheduleReconnect();
  }

  _scheduleReconnect() {
    if (this._closedForGood || !this.track) return;
    // Exponential backoff with jitter, so 500 students whose Wi-Fi drops together do not return together.
    const delay = Math.round(this._backoff * (0.5 + Math.random() * 0.5));
    this._backoff = Math.min(this._backoff * 2, BACKOFF_MAX_MS);
    this.stats.reconnects += 1;
    this._setState("reconnecting", `Connection lost; trying again in ${Math.ceil(delay / 1000)} s…`);
    this._reconnectTimer = setTimeout(() => this._connect(), delay);
  }

  _startHeartbeat() {
    clearInterval(this._heartbeatTimer);
    const period = Math.max(1, Number(this.config.heartbeat_s) || 5) * 1000;
    this._heartbeatTimer = setInterval(() => this._send({ type: "heartbeat", t: Date.now() }), period);
  }

  _send(message) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(message));
  }

  _scheduleCapture(delayMs) {
    clearTimeout(this._captureTimer);
    this._captureTimer = setTimeout(() => this._captureLoop(), delayMs);
  }

  async _captureLoop() {
    const started = performance.now();
    try {
      await this.sendFrame();
    } catch (err) {
      this.stats.lastError = String(err);
    }
    const period = 1000 / Math.max(0.01, Number(this.config.fps) || 0.5);
    if (this.ws && this.ws.readyState === WebSocket.OPEN && this.track) {
      this._scheduleCapture(Math.max(0, period - (performance.now() - started)));
    }
  }

  /** Capture one frame at the configured size and quality and send it; false when skipped. */
  async sendFrame() {
    const ws = this.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN || !this.track || this._encoding) return false;
    if (this.track.muted || this.video.videoWidth === 0) { this.stats.framesSkipped += 1; return false; }
    if (ws.bufferedAmount > MAX_BUFFERED_BYTES) { this.stats.framesSkipped += 1; return false; }
    this._encoding = true;
    try {
      const [w, h] = scaledSize(this.video.videoWidth, this.video.videoHeight, Number(this.config.max_width) || 640);
      if (this.canvas.width !== w) this.canvas.width = w;
      if (this.canvas.height !== h) this.canvas.height = h;
      const ctx = smoothContext(this.canvas);
      const captureMs = Date.now();
      const seq = this.seq;
      // Keep this very picture at full size when evidence would be larger than the frame sent.
      const full = this.video.videoWidth > w && Number(this.config.evidence_max_width) > w
        ? await createImageBitmap(this.video) : null;
      ctx.drawImage(full || this.video, 0, 0, w, h);
      const blob = await this._jpeg(this.canvas);
      const jpeg = blob ? await blob.arrayBuffer() : null;
      if (!jpeg || ws.readyState !== WebSocket.OPEN) {
        if (full) full.close();
        return false;
      }
      this._sendBinary(ws, frameHeader(seq, captureMs), jpeg);
      if (full) this._remember(seq, captureMs, full);
      this.seq = (seq + 1) >>> 0;
      this.stats.framesSent += 1;
      this.stats.bytesSent += HEADER_SIZE + jpeg.byteLength;
      this.stats.lastFrame = { width: w, height: h, bytes: jpeg.byteLength };
      return true;
    } finally {
      this._encoding = false;
    }
  }

  /** Answer evidence_request: frame `seq` again, at up to evidence_max_width; false when no longer held. */
  async sendEvidence(seq) {
    const kept = this._recent.find((r) => r.seq === seq);
    const ws = this.ws;
    if (!kept || !ws || ws.readyState !== WebSocket.OPEN) { this.stats.evidenceMissing += 1; return false; }
    const [w, h] = scaledSize(kept.bitmap.width, kept.bitmap.height, Number(this.config.evidence_max_width) || 1920);
    const canvas = document.createElement("canvas");
    canvas.width = w;
    canvas.height = h;
    smoothContext(canvas).drawImage(kept.bitmap, 0, 0, w, h);
    const blob = await this._jpeg(canvas);
    if (!blob || ws.readyState !== WebSocket.OPEN) return false;
    this._sendBinary(ws, frameHeader(seq, kept.captureMs, FLAG_EVIDENCE), await blob.arrayBuffer());
    this.stats.evidenceSent += 1;
    this.stats.lastEvidence = { seq, width: w, height: h, bytes: blob.size };
    return true;
  }

  _jpeg(canvas) {
    const quality = Math.min(1, Math.max(0.1, Number(this.config.jpeg_quality) || 0.7));
    return new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", quality));
  }

  _sendBinary(ws, header, jpeg) {
    const message = new Uint8Array(HEADER_SIZE + jpeg.byteLength);
    message.set(new Uint8Array(header), 0);
    message.set(new Uint8Array(jpeg), HEADER_SIZE);
    ws.send(message.buffer);
  }

  _remember(seq, captureMs, bitmap) {
    this._recent.push({ seq, captureMs, bitmap });
    this._forgetRecent(EVIDENCE_KEEP);
  }

  /** Keep only the newest `keep` full-size frames (their pixels are freed at once, not by the GC). */
  _forgetRecent(keep) {
    while (this._recent.length > keep) this._recent.shift().bitmap.close();
  }
}

/** The stream URL of an exam on this page's server: wss:// under https, ws:// otherwise. */
export function streamUrl(examId, loc = window.location) {
  return `${loc.protocol === "https:" ? "wss:" : "ws:"}//${loc.host}/ws/exams/${encodeURIComponent(examId)}/stream`;
}
