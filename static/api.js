// HTTP helpers, the access token, toasts and number formatting shared by the page's modules.

const TOKEN_KEY = "arc-lab-token";
const TOAST_MS = 5000;

let authRequired = false;

export function setAuthRequired(required) {
  authRequired = Boolean(required);
}

export const authIsRequired = () => authRequired;

function token() {
  if (!authRequired) return null;
  let value = sessionStorage.getItem(TOKEN_KEY);
  if (!value) {
    value = window.prompt("This server needs its access token (app.py --token):") || "";
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
  }
  return value || null;
}

function authHeaders() {
  const value = token();
  return value ? { Authorization: `Bearer ${value}` } : {};
}

/** Fetch JSON; resolves to {ok, status, data}. Network failures come back as status 0. */
async function request(method, url, body) {
  const headers = method === "GET" ? {} : authHeaders();
  const init = { method, headers };
  if (method === "POST" && body === undefined) body = {}; // every POST carries a JSON body
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(url, init);
  } catch (error) {
    return { ok: false, status: 0, data: { error: `network error: ${error.message}` } };
  }
  if (response.status === 401) sessionStorage.removeItem(TOKEN_KEY); // ask again next time
  const data = await response.json().catch(() => ({ error: `${response.status} ${response.statusText}` }));
  return { ok: response.ok, status: response.status, data };
}

export const getJSON = (url) => request("GET", url);

/** GET that shows a red toast on failure and returns the data or null. */
export async function load(url) {
  const result = await getJSON(url);
  if (!result.ok) {
    toast(`${url}: ${result.data.error || result.status}`, "error");
    return null;
  }
  return result.data;
}

/** POST/DELETE that toasts the server's error; returns the result either way. */
export async function send(method, url, body) {
  const result = await request(method, url, body);
  if (!result.ok) toast(result.data.error || `request failed (${result.status})`, "error");
  return result;
}

/** Download a file with the access token: fetch it, then save the blob under filename. */
export async function download(url, filename) {
  const response = await fetch(url, { headers: authHeaders() });
  if (!response.ok) {
    if (response.status === 401) sessionStorage.removeItem(TOKEN_KEY);
    const data = await response.json().catch(() => ({}));
    toast(data.error || `download failed (${response.status})`, "error");
    return;
  }
  const link = document.createElement("a");
  link.href = URL.createObjectURL(await response.blob());
  link.download = filename;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
}

/** A toast at the top right; kind is success, error or info. Dismisses itself after 5 s, or on click. */
export function toast(message, kind = "info") {
  const element = document.createElement("div");
  element.className = `toast toast-${kind}`;
  element.setAttribute("role", kind === "error" ? "alert" : "status");
  element.textContent = message;
  element.title = "click to dismiss";
  element.addEventListener("click", () => element.remove());
  document.getElementById("toasts").append(element);
  setTimeout(() => element.remove(), TOAST_MS);
  return element;
}

// ---------------------------------------------------------------------------------------------- formatting

export function formatBytes(bytes) {
  if (bytes === null || bytes === undefined || !Number.isFinite(bytes)) return "unknown";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(unit === 0 ? 0 : 1)} ${units[unit]}`;
}

export function formatNumber(value, digits = 4) {
  if (value === null || value === undefined) return "–";
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return value.toLocaleString("en");
  return Math.abs(value) >= 1000 ? value.toFixed(0) : value.toPrecision(digits);
}

export function formatDate(iso, withSeconds = false) {
  if (!iso) return "–";
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return iso;
  return date.toLocaleString(undefined, { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit",
    second: withSeconds ? "2-digit" : undefined, hour12: false });
}

/** Create an element with attributes/properties and children (strings become text). */
export function el(tag, props = {}, ...children) {
  const element = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "className" || key === "textContent" || key === "value" || key === "checked") element[key] = value;
    else element.setAttribute(key, value === true ? "" : value);
  }
  element.append(...children.filter((c) => c !== null && c !== undefined && c !== false));
  return element;
}
