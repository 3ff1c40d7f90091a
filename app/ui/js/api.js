// The API client of the dashboard: the key (kept for the browser session), JSON calls,
// the Server-Sent Events stream (read with fetch, since EventSource cannot send a key) and
// downloads whose sha256 is checked in the browser.

export const API = "/api/v1";
const KEY = "mwt.apiKey";

export function getKey() { return sessionStorage.getItem(KEY); }
export function setKey(k) { sessionStorage.setItem(KEY, k); }
export function clearKey() { sessionStorage.removeItem(KEY); }

/** An HTTP error with the server's message (`detail`) and status. */
export class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function headers(extra = {}) {
  const h = { ...extra };
  const k = getKey();
  if (k) h.Authorization = `Bearer ${k}`;
  return h;
}

async function errorOf(res) {
  let msg = `${res.status} ${res.statusText}`;
  try {
    const body = await res.json();
    if (typeof body.detail === "string") msg = `${res.status}: ${body.detail}`;
    else if (body.detail) msg = `${res.status}: ${JSON.stringify(body.detail)}`;
  } catch { /* not JSON: keep the status line */ }
  return new ApiError(res.status, msg);
}

/** Call the API; returns parsed JSON or throws ApiError with the server's message. */
export async function api(path, { method = "GET", body, form } = {}) {
  const init = { method, headers: headers() };
  if (form) init.body = form;
  else if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const res = await fetch(path.startsWith("/") ? path : `${API}/${path}`, init);
  if (!res.ok) throw await errorOf(res);
  return res.status === 204 ? null : res.json();
}

/** Build a query string from an object, leaving out empty values. */
export function qs(params) {
  const u = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== "" && v !== null && v !== undefined) u.append(k, v);
  const s = u.toString();
  return s ? `?${s}` : "";
}

/**
 * Follow a job's event stream; onEvent(name, data) for each event. Returns an AbortController.
 * Reconnects after a dropped connection until an `end` event arrives or abort() is called.
 */
export function followEvents(jobId, onEvent, onError) {
  const ctrl = new AbortController();
  (async () => {
    let ended = false;
    while (!ended && !ctrl.signal.aborted) {
      try {
        const res = await fetch(`${API}/jobs/${encodeURIComponent(jobId)}/events`,
          { headers: headers({ Accept: "text/event-stream" }), signal: ctrl.signal });
        if (!res.ok) { onError(await errorOf(res)); return; }
        const reader = res.body.getReader();
        const dec = new TextDecoder();
        let buf = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += dec.decode(value, { stream: true });
          let i;
          while ((i = buf.indexOf("\n\n")) >= 0) {
            const block = buf.slice(0, i); buf = buf.slice(i + 2);
            let name = "message", data = "";
            for (const line of block.split("\n")) {
              if (line.startsWith("event:")) name = line.slice(6).trim();
              else if (line.startsWith("data:")) data += line.slice(5).trim();
            }
            if (!data) continue;
            onEvent(name, JSON.parse(data));
            if (name === "end") ended = true;
          }
        }
      } catch (e) {
        if (ctrl.signal.aborted) return;
        onError(e);
      }
      if (!ended && !ctrl.signal.aborted) await new Promise((r) => setTimeout(r, 2000));
    }
  })();
  return ctrl;
}

async function sha256Hex(buf) {
  if (!crypto.subtle) return null; // only in secure contexts (https or localhost)
  const d = await crypto.subtle.digest("SHA-256", buf);
  return [...new Uint8Array(d)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * Download an authenticated file and save it; checks its sha256 against `expected` when given.
 * Returns {sha256, verified, filename, size}.
 */
export async function download(path, expected) {
  const res = await fetch(path, { headers: headers() });
  if (!res.ok) throw await errorOf(res);
  const blob = await res.blob();
  const cd = res.headers.get("Content-Disposition") || "";
  const m = /filename\*?=(?:UTF-8'')?"?([^";]+)"?/i.exec(cd);
  const filename = m ? decodeURIComponent(m[1]) : path.split("/").slice(-2).join("-");
  const sha = await sha256Hex(await blob.arrayBuffer());
  const expect = expected || (res.headers.get("ETag") || "").replace(/"/g, "") || null;
  if (sha && expect && sha !== expect) {
    throw new ApiError(0, `download corrupted: sha256 ${sha.slice(0, 12)}… is not the registry's ${expect.slice(0, 12)}…`);
  }
  const url = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = url; a.download = filename; document.body.append(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
  return { sha256: sha, verified: Boolean(sha && expect), filename, size: blob.size };
}

/** Upload with progress (fetch has no upload progress): onProgress(fraction). */
export function upload(path, form, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    const k = getKey();
    if (k) xhr.setRequestHeader("Authorization", `Bearer ${k}`);
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) onProgress(e.loaded / e.total); };
    xhr.onload = () => {
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch { /* keep null */ }
      if (xhr.status >= 200 && xhr.status < 300) resolve(body);
      else reject(new ApiError(xhr.status, `${xhr.status}: ${body && body.detail ? (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)) : xhr.statusText}`));
    };
    xhr.onerror = () => reject(new ApiError(0, "network error during upload"));
    xhr.send(form);
  });
}
