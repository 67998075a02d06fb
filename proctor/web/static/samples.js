// "Record samples" page: the student page's ScreenStreamer sends the teacher's screen to /ws/samples,
// the server stores each changed frame and answers the count; "Train head" starts and follows a job.
import { ScreenStreamer } from "/static/stream.js";

const csrf = document.querySelector('meta[name="csrf-token"]').content;
const minPositives = Number(document.body.dataset.minPositives);
const labelInput = document.getElementById("label");
const shareButton = document.getElementById("share");
const stopButton = document.getElementById("stop");
const trainButton = document.getElementById("train");
const statusEl = document.getElementById("status");
const detailEl = document.getElementById("status-detail");
const warningEl = document.getElementById("warning");
const countEl = document.getElementById("count");
const countLabel = document.getElementById("count-label");
const progressEl = document.getElementById("train-progress");
const trainStatus = document.getElementById("train-status");
const metricsEl = document.getElementById("train-metrics");
const NAME = /^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$/;
const LABELS = {
  idle: "Not recording", connecting: "Connecting…", sharing: "Recording", paused: "Paused",
  reconnecting: "Reconnecting…", stopped: "Not recording", ended: "Not recording", error: "Not recording",
};

let streamer = null;
let counts = {};
let polling = null;

function warn(text) {
  warningEl.textContent = text || "";
  warningEl.hidden = !text;
}

function label() { return labelInput.value.trim(); }

function setCount(n) {
  countEl.textContent = String(n);
  countEl.dataset.count = String(n);
  countLabel.textContent = label() || "—";
  const recording = streamer !== null;
  trainButton.disabled = recording || polling !== null || n < minPositives;
  trainButton.title = n < minPositives ? `Record at least ${minPositives} samples first` : "";
}

/** ScreenStreamer as it is, plus the recording socket's answers: {"type": "sample", "count": N, ...}. */
class SampleRecorder extends ScreenStreamer {
  _onMessage(event) {
    if (typeof event.data === "string") {
      let msg = null;
      try { msg = JSON.parse(event.data); } catch (err) { /* not ours */ }
      if (msg && msg.type === "sample") { setCount(msg.count); if (msg.stored) warn(""); return; }
      if (msg && msg.type === "config" && typeof msg.count === "number") setCount(msg.count);
      if (msg && msg.type === "error") {
        warn(msg.message);
        if (msg.code === "sample_limit") this.stop();
      }
    }
    super._onMessage(event);
  }
}

function showStatus(state, detail) {
  statusEl.textContent = LABELS[state] || state;
  statusEl.className = `status ${state}`;
  statusEl.dataset.state = state;
  const active = ["connecting", "sharing", "paused", "reconnecting"].includes(state);
  detailEl.textContent = active ? (detail || "") : (state === "error" ? detail : "Recording stopped.");
  shareButton.hidden = active;
  stopButton.hidden = !active;
  labelInput.disabled = active;
  if (!active && streamer) { streamer = null; setCount(Number(countEl.dataset.count)); refreshCounts(); }
  if (state === "error") warn(detail);
}

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options,
    headers: { "X-CSRF-Token": csrf, ...(options.body ? { "Content-Type": "application/json" } : {}) } });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.error || `${response.status} ${response.statusText}`);
  return data;
}

async function refreshCounts() {
  try { counts = (await api("/api/samples")).labels; } catch (err) { return; }
  if (!streamer) setCount(counts[label()] || 0);
}

labelInput.addEventListener("input", () => {
  const ok = NAME.test(label());
  shareButton.disabled = !ok;
  labelInput.setCustomValidity(ok || !label() ? "" : "letters, digits, . _ - (up to 64)");
  setCount(counts[label()] || 0);
});

shareButton.addEventListener("click", async () => {
  warn("");
  const url = `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/ws/samples?label=${encodeURIComponent(label())}`;
  streamer = new SampleRecorder({ url, onStatus: showStatus, video: document.getElementById("preview") });
  try {
    await streamer.start();
  } catch (err) {
    streamer = null;
    showStatus("error", err.name === "NotAllowedError" ? "Screen sharing was not allowed." : err.message);
  }
});

stopButton.addEventListener("click", () => { if (streamer) streamer.stop(); });

function showJob(job) {
  const p = job.progress || {};
  progressEl.hidden = job.state === "done" || job.state === "failed";
  progressEl.max = Math.max(1, p.total || 1);
  progressEl.value = p.done || 0;
  trainStatus.dataset.state = job.state;
  if (job.state === "done") {
    trainStatus.textContent = `Head ${job.label} ${job.replaced ? "retrained" : "trained"}`
      + (job.active ? ` and loaded (${job.seconds} s).` : `, but it is deactivated: an admin activates it on the Heads page.`);
    const m = job.metrics || {};
    metricsEl.textContent = `Validation: recall ${m.recall}, false alarms ${m.false_alarm_rate}, false accepts ${m.false_accept_rate}, threshold ${m.threshold}\n`
      + `${job.positives} samples against ${job.negatives} screens of other programs.`;
    metricsEl.hidden = false;
  } else if (job.state === "failed") {
    trainStatus.textContent = `Training ${job.label} failed: ${job.error}`;
  } else {
    trainStatus.textContent = `Training ${job.label}: ${p.stage || job.state} ${p.total ? `${p.done}/${p.total}` : ""}`;
  }
}

function follow(jobId) {
  clearInterval(polling);
  polling = setInterval(async () => {
    try {
      const { job } = await api(`/api/training/${encodeURIComponent(jobId)}`);
      showJob(job);
      if (job.state === "done" || job.state === "failed") { clearInterval(polling); polling = null; setCount(Number(countEl.dataset.count)); }
    } catch (err) {
      trainStatus.textContent = `Cannot follow the training job: ${err.message}`;
      clearInterval(polling); polling = null;
    }
  }, 1000);
}

trainButton.addEventListener("click", async () => {
  metricsEl.hidden = true;
  try {
    const { job } = await api(`/api/samples/${encodeURIComponent(label())}/train`, {
      method: "POST",
      body: JSON.stringify({ program: document.getElementById("program").value, description: document.getElementById("description").value }),
    });
    showJob(job);
    follow(job.id);
    setCount(Number(countEl.dataset.count));
  } catch (err) {
    trainStatus.textContent = `Not started: ${err.message}`;
  }
});

if (document.body.dataset.runningJob) follow(document.body.dataset.runningJob);
refreshCounts();
