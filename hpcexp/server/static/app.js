// hpcexp dashboard: live logs (Server-Sent Events) and job progress. No framework, no build step.
// Everything received is inserted as text (textContent), never as markup.
"use strict";

function followLog(pre) {
  const url = pre.dataset.events;
  const badge = document.querySelector('.live[data-for="' + pre.id.replace("log-", "") + '"]');
  const MAX = 2 * 1024 * 1024;  // keep the page light: the newest 2 MiB of text
  const es = new EventSource(url);
  let attempt = 0;
  if (badge) { badge.textContent = "live"; badge.className = "live on"; }
  es.addEventListener("attempt", (ev) => {
    const n = parseInt(ev.data, 10);
    if (attempt && n !== attempt) {
      pre.appendChild(document.createTextNode("\n--- attempt " + n + " ---\n"));
    }
    attempt = n;
  });
  es.onmessage = (ev) => {
    const text = JSON.parse(ev.data);
    const atBottom = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 40;
    pre.appendChild(document.createTextNode(text));
    if (pre.textContent.length > MAX) {
      pre.textContent = pre.textContent.slice(-MAX);
    }
    if (atBottom) { pre.scrollTop = pre.scrollHeight; }
    pre.dataset.received = String((parseInt(pre.dataset.received || "0", 10)) + text.length);
  };
  es.addEventListener("end", () => {
    es.close();
    const meta = document.getElementById("run-meta");
    if (meta && meta.dataset.terminal === "0" && !meta.dataset.reloading) {
      // the run ended while we watched: show its final record (exit code, duration, no Stop)
      meta.dataset.reloading = "1";
      window.location.reload();
      return;
    }
    if (badge) { badge.textContent = "ended"; badge.className = "live"; }
    pre.dataset.ended = "1";
  });
  es.onerror = () => { if (badge && es.readyState === EventSource.CLOSED) { badge.textContent = "disconnected"; } };
}

function refreshState() {
  const meta = document.getElementById("run-meta");
  if (!meta) { return; }
  fetch("/api/runs/" + encodeURIComponent(meta.dataset.run), {credentials: "same-origin"})
    .then((r) => r.json())
    .then((data) => {
      if (!Array.isArray(data) || !data.length) { return; }
      const state = data[0].state;
      const el = document.getElementById("state");
      if (el) {
        el.replaceChildren();
        const span = document.createElement("span");
        span.className = "state state-" + state;
        span.textContent = state;
        el.appendChild(span);
      }
      const h1 = document.querySelector("h1 .state");
      if (h1) { h1.className = "state state-" + state; h1.textContent = state; }
    })
    .catch(() => {});
}

function pollJob(box) {
  const id = box.dataset.job;
  const lines = document.getElementById("job-lines");
  const stateEl = document.getElementById("job-state");
  const runs = document.getElementById("job-runs");
  const err = document.getElementById("job-error");
  const tick = () => {
    fetch("/api/jobs/" + encodeURIComponent(id), {credentials: "same-origin"})
      .then((r) => r.json())
      .then((job) => {
        lines.textContent = job.lines.join("\n");
        stateEl.textContent = job.state;
        stateEl.className = "state state-" + job.state;
        if (job.error) { err.textContent = job.error + (job.hint ? " — " + job.hint : ""); }
        runs.replaceChildren();
        for (const r of job.run_ids) {
          const a = document.createElement("a");
          a.href = "/runs/" + encodeURIComponent(r);
          a.textContent = r;
          runs.appendChild(a);
          runs.appendChild(document.createTextNode(" "));
        }
        if (job.state === "running") { setTimeout(tick, 300); return; }
        if (job.state === "succeeded" && job.kind === "run" && job.run_ids.length === 1) {
          window.location.assign("/runs/" + encodeURIComponent(job.run_ids[0]));
        }
      })
      .catch(() => setTimeout(tick, 1000));
  };
  tick();
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("pre.log[data-events]").forEach(followLog);
  const job = document.getElementById("job");
  if (job) { pollJob(job); }
});
