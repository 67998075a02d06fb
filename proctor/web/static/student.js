// Student exam page: consent, "Share screen", status and warnings around ScreenStreamer.
import { ScreenStreamer, NotWholeScreenError, streamUrl, displayInfo } from "/static/stream.js";

const examId = document.body.dataset.examId;
const consent = document.getElementById("consent-check");
const shareButton = document.getElementById("share");
const stopButton = document.getElementById("stop");
const statusEl = document.getElementById("status");
const detailEl = document.getElementById("status-detail");
const warningEl = document.getElementById("warning");

const LABELS = {
  idle: "Not sharing", connecting: "Connecting…", sharing: "Sharing your screen", paused: "Paused",
  reconnecting: "Reconnecting…", stopped: "Not sharing", ended: "Exam ended", error: "Not sharing",
};

function warn(text) {
  warningEl.textContent = text || "";
  warningEl.hidden = !text;
}

function showStatus(state, detail) {
  statusEl.textContent = LABELS[state] || state;
  statusEl.className = `status ${state}`;
  statusEl.dataset.state = state;
  detailEl.textContent = detail || "";
  const active = ["connecting", "sharing", "paused", "reconnecting"].includes(state);
  // The notice was read and agreed to: fold it away so the status fits a laptop screen.
  document.getElementById("consent").classList.toggle("agreed", active);
  shareButton.hidden = active || state === "ended";
  stopButton.hidden = !active;
  if (state === "stopped" || state === "error") warn(detail);
  else if (state === "sharing") warn(multiDisplayWarning());
  if (state === "reconnecting") explainRefusal();
}

// A refused connection looks like a dropped one to the page: ask the API whether the exam is running.
async function explainRefusal() {
  try {
    const response = await fetch(`/api/exams/${encodeURIComponent(examId)}`, { credentials: "same-origin" });
    if (response.status === 401) { detailEl.textContent = "Your login has expired: log in again in another tab; sharing resumes by itself."; return; }
    const { exam } = await response.json();
    if (exam && exam.state === "draft") detailEl.textContent = "The exam has not started yet; sending begins by itself when your teacher starts it.";
    else if (exam && exam.state === "ended") {
      streamer.stop();
      showStatus("ended", "The exam has ended. You can close this page.");
    }
  } catch (err) {
    // Offline: the status line already says we are reconnecting.
  }
}

function multiDisplayWarning() {
  return displayInfo().extended
    ? "Your computer has more than one display. Your teacher is told; unplug the extra display or keep only the exam on screen."
    : "";
}

const streamer = new ScreenStreamer({
  url: streamUrl(examId),
  video: document.getElementById("preview"),
  onStatus: showStatus,
});
window.proctorStreamer = streamer;  // for support staff poking at the console (and the end-to-end test)

consent.addEventListener("change", () => { shareButton.disabled = !consent.checked; });
shareButton.disabled = !consent.checked;

shareButton.addEventListener("click", async () => {
  warn("");
  shareButton.disabled = true;
  try {
    await streamer.start();
  } catch (err) {
    showStatus("error", "");
    if (err instanceof NotWholeScreenError) warn(err.message);
    else if (err && err.name === "NotAllowedError") warn("Screen sharing was cancelled or blocked. Press \"Share screen\" and choose \"Entire screen\"; the exam needs it.");
    else warn(`Could not share the screen: ${err && err.message ? err.message : err}`);
  } finally {
    shareButton.disabled = !consent.checked;
  }
});

stopButton.addEventListener("click", () => streamer.stop());
window.addEventListener("beforeunload", (event) => {
  if (["sharing", "paused", "reconnecting"].includes(streamer.state)) {
    event.preventDefault();
    event.returnValue = "";
  }
});
