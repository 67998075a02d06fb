// Alert dialog of the dashboard: "False positive: it showed <program>" stores the evidence as a training
// sample of that program's head. The alert shown is the one whose evidence the dialog's image loads.
const csrf = document.querySelector('meta[name="csrf-token"]').content;
const form = document.getElementById("ad-sample");
const result = document.getElementById("ad-sample-result");

function shownAlert() {
  const src = document.getElementById(form.dataset.image).getAttribute("src") || "";
  const match = src.match(/\/api\/alerts\/([^/]+)\/evidence/);
  return match ? decodeURIComponent(match[1]) : null;
}

new MutationObserver(() => { result.textContent = ""; })
  .observe(document.getElementById(form.dataset.image), { attributes: true, attributeFilter: ["src"] });

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const id = shownAlert();
  const label = document.getElementById("ad-sample-label").value;
  if (!id || !label) { result.textContent = "No alert or head picked."; return; }
  try {
    const response = await fetch(`/api/alerts/${encodeURIComponent(id)}/sample`, {
      method: "POST", credentials: "same-origin",
      headers: { "X-CSRF-Token": csrf, "Content-Type": "application/json" }, body: JSON.stringify({ label }),
    });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(data.error || `${response.status} ${response.statusText}`);
    result.textContent = `Stored as a sample of ${label}; the alert is marked ${data.alert.review_state.replace("_", " ")}. Train the head on the Record samples page to use it.`;
    result.dataset.saved = label;
  } catch (err) {
    result.textContent = `Not stored: ${err.message}`;
  }
});
