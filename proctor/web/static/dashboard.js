// Teacher's live dashboard: presence and alerts over /ws/exams/{id}/live, alert details and review.
const examId = document.body.dataset.examId;
const csrf = document.querySelector('meta[name="csrf-token"]').content;
const tbody = document.querySelector("#students tbody");
const alertList = document.getElementById("alerts");
const noAlerts = document.getElementById("no-alerts");
const liveStatus = document.getElementById("live-status");
const counts = document.getElementById("counts");
const dialog = document.getElementById("alert-dialog");

const STATE_LABELS = { live: "live", stale: "stale heartbeat", disconnected: "disconnected", not_sharing: "not sharing" };
const students = new Map();  // student_id -> {student_id, username, full_name, state, displays, alerts, last_alert}
const alerts = new Map();    // alert id -> alert
let current = null;          // alert shown in the dialog

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function timeOf(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toLocaleTimeString();
}

function describe(alert) {
  return alert.verdict === "forbidden_program" ? `Forbidden: ${alert.program}` : "Unrecognised screen";
}

function upsertStudent(s) {
  const old = students.get(s.student_id) || { alerts: 0, last_alert: null };
  const merged = { ...old, ...s };
  students.set(s.student_id, merged);
  let row = tbody.querySelector(`tr[data-student-id="${s.student_id}"]`);
  if (!row) {
    row = el("tr", { "data-student-id": String(s.student_id) }, el("td"), el("td"), el("td", { class: "num" }), el("td"));
    tbody.append(row);
  }
  const [nameCell, stateCell, countCell, lastCell] = row.children;
  nameCell.replaceChildren(merged.full_name || merged.username || `#${s.student_id}`, " ",
    el("small", { text: merged.username || "" }));
  const state = merged.state || "disconnected";
  const badge = el("span", { class: `state ${state}`, text: STATE_LABELS[state] || state });
  stateCell.replaceChildren(badge);
  row.dataset.state = state;
  if ((merged.displays || 0) > 1) {
    stateCell.append(el("span", { class: "state displays", title: "The student's computer reports more than one display", text: `${merged.displays} displays` }));
  }
  countCell.textContent = String(merged.alerts || 0);
  lastCell.textContent = merged.last_alert ? timeOf(merged.last_alert.opened_at || merged.last_alert) : "";
  row.classList.toggle("alerting", (merged.alerts || 0) > 0);
  updateCounts();
}

function updateCounts() {
  const by = {};
  for (const s of students.values()) by[s.state] = (by[s.state] || 0) + 1;
  counts.textContent = Object.entries(by).map(([k, v]) => `${v} ${STATE_LABELS[k] || k}`).join(" · ");
}

function addAlert(alert, { live = false } = {}) {
  const isNew = !alerts.has(alert.id);
  alerts.set(alert.id, { ...(alerts.get(alert.id) || {}), ...alert });
  let item = alertList.querySelector(`li[data-alert-id="${alert.id}"]`);
  const thumb = el("img", { alt: "" });
  if (alert.thumbnail) thumb.src = alert.thumbnail;
  const text = el("div", {}, el("strong", { text: alert.full_name || alert.username || `#${alert.student_id}` }), el("br"),
    `${describe(alert)} · ${timeOf(alert.opened_at)}`);
  const node = el("li", { "data-alert-id": alert.id, tabindex: "0", class: alert.review_state || "new" }, thumb, text);
  if (item) item.replaceWith(node); else alertList.prepend(node);
  node.addEventListener("click", () => openAlert(alert.id));
  node.addEventListener("keydown", (e) => { if (e.key === "Enter") openAlert(alert.id); });
  noAlerts.hidden = alerts.size > 0;
  if (live && isNew) {
    const s = students.get(alert.student_id) || { student_id: alert.student_id, username: alert.username };
    upsertStudent({ ...s, alerts: (s.alerts || 0) + 1, last_alert: { id: alert.id, opened_at: alert.opened_at } });
  }
}

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options,
    headers: { "X-CSRF-Token": csrf, ...(options.body ? { "Content-Type": "application/json" } : {}), ...(options.headers || {}) } });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.error || `${response.status} ${response.statusText}`);
  return data;
}

async function openAlert(id) {
  current = id;
  const summary = alerts.get(id) || {};
  document.getElementById("ad-title").textContent = `${summary.full_name || summary.username || "Student"} · ${describe(summary)}`;
  document.getElementById("ad-image").src = `/api/alerts/${encodeURIComponent(id)}/evidence`;
  const result = document.getElementById("ad-result");
  result.textContent = "";
  delete result.dataset.saved;
  document.getElementById("ad-scores").replaceChildren();
  document.getElementById("ad-verdict").textContent = "Loading…";
  dialog.showModal();
  try {
    const { alert } = await api(`/api/alerts/${encodeURIComponent(id)}`);
    alerts.set(id, { ...summary, ...alert });
    document.getElementById("ad-verdict").textContent =
      `${describe(alert)} at ${timeOf(alert.opened_at)}${alert.closed_at ? `, over at ${timeOf(alert.closed_at)}` : ", still open"}. Review: ${alert.review_state.replace("_", " ")}.`;
    const rows = (alert.top_scores || []).map(([head, score]) => el("tr", {}, el("td", { text: head }), el("td", { class: "num", text: Number(score).toFixed(3) })));
    document.getElementById("ad-scores").replaceChildren(...rows);
    document.getElementById("ad-note").value = alert.review_note || "";
    if (alert.review_state !== "new") document.getElementById("ad-state").value = alert.review_state;
  } catch (err) {
    document.getElementById("ad-verdict").textContent = `Could not load the alert: ${err.message}`;
  }
}

document.getElementById("ad-review").addEventListener("submit", async (event) => {
  event.preventDefault();
  const result = document.getElementById("ad-result");
  try {
    const { alert } = await api(`/api/alerts/${encodeURIComponent(current)}/review`, {
      method: "POST",
      body: JSON.stringify({ state: document.getElementById("ad-state").value, note: document.getElementById("ad-note").value }),
    });
    addAlert({ ...alerts.get(current), ...alert });
    result.textContent = `Saved: ${alert.review_state.replace("_", " ")}.`;
    result.dataset.saved = alert.review_state;
  } catch (err) {
    result.textContent = `Not saved: ${err.message}`;
  }
});

let backoff = 1000;
function connect() {
  const url = `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/ws/exams/${encodeURIComponent(examId)}/live`;
  liveStatus.textContent = "connecting…";
  liveStatus.className = "status connecting";
  const ws = new WebSocket(url);
  ws.addEventListener("open", () => {
    backoff = 1000;
    liveStatus.textContent = "live updates on";
    liveStatus.className = "status live";
  });
  ws.addEventListener("message", (event) => {
    let msg;
    try { msg = JSON.parse(event.data); } catch (err) { return; }
    if (msg.type === "snapshot") (msg.students || []).forEach(upsertStudent);
    else if (msg.type === "presence") upsertStudent(msg);
    else if (msg.type === "alert") addAlert(msg.alert, { live: true });
    else if (msg.type === "alert_closed") {
      const a = alerts.get(msg.alert_id);
      if (a) a.closed_at = msg.closed_at;
    }
  });
  ws.addEventListener("close", (event) => {
    if (event.code === 4000) {
      liveStatus.textContent = "exam ended";
      liveStatus.className = "status ended";
      return;
    }
    const ended = { 4003: "account deactivated", 4004: "password reset: log in again", 4005: "logged out: log in again" };
    if (ended[event.code]) {
      // Account deactivated, password reset or logged out: reconnecting would only be refused.
      liveStatus.textContent = ended[event.code];
      liveStatus.className = "status ended";
      return;
    }
    const delay = Math.round(backoff * (0.5 + Math.random() * 0.5));
    backoff = Math.min(backoff * 2, 30000);
    liveStatus.textContent = `disconnected, retrying in ${Math.ceil(delay / 1000)} s`;
    liveStatus.className = "status reconnecting";
    setTimeout(connect, delay);
  });
}

async function loadAlerts() {
  try {
    const { alerts: past } = await api(`/api/exams/${encodeURIComponent(examId)}/alerts`);
    past.sort((a, b) => String(a.opened_at).localeCompare(String(b.opened_at))).forEach((a) => { if (!alerts.has(a.id)) addAlert(a); });
  } catch (err) {
    noAlerts.textContent = `Could not load earlier alerts: ${err.message}`;
  }
}

document.getElementById("end-form")?.addEventListener("submit", (event) => {
  if (!confirm("End the exam for every student now?")) event.preventDefault();
});

loadAlerts();
if (document.body.dataset.examState !== "ended") connect();
