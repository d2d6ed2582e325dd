// HTTP helpers, the access token, toasts and number formatting shared by the page's modules.

const TOAST_MS = 5000;

let authRequired = false;
let loggingIn = null; // the one login in progress: requests answered 401 together share its prompt
let loginRefused = false; // a wrong or no token: not asked again until the page is reloaded

export function setAuthRequired(required) {
  authRequired = Boolean(required);
}

export const authIsRequired = () => authRequired;

/** Ask for the token once and trade it for the server's cookie (HttpOnly: this page never holds it again). */
async function login() {
  const token = window.prompt("This server needs its access token (app.py --token):");
  if (!token) {
    loginRefused = true;
    return false;
  }
  let response;
  try {
    response = await fetch("/login", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ token }) });
  } catch (error) {
    return false;
  }
  if (!response.ok) {
    loginRefused = true;
    toast("wrong access token; reload the page to try again", "error");
  }
  authRequired = true;
  return response.ok;
}

function loginOnce() {
  if (loginRefused) return Promise.resolve(false);
  if (!loggingIn) loggingIn = login().finally(() => { loggingIn = null; });
  return loggingIn;
}

/** Fetch JSON; resolves to {ok, status, data}. Network failures come back as status 0. Every other method than
 * GET sends a JSON body and its content type, which the server requires of any state change. */
async function request(method, url, body, retried = false) {
  const init = { method, headers: {} };
  if (method !== "GET") {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body === undefined ? {} : body);
  }
  let response;
  try {
    response = await fetch(url, init);
  } catch (error) {
    return { ok: false, status: 0, data: { error: `network error: ${error.message}` } };
  }
  if (response.status === 401 && !retried && await loginOnce()) return request(method, url, body, true);
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

/** Download a file through fetch (the login cookie goes with it), then save the blob under filename. */
export async function download(url, filename) {
  const response = await fetch(url);
  if (!response.ok) {
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

/** A toast at the bottom right; kind is success, error or info. Dismisses itself after ms (5 s), or on click. */
export function toast(message, kind = "info", ms = TOAST_MS) {
  const element = document.createElement("div");
  element.className = `toast toast-${kind}`;
  element.setAttribute("role", kind === "error" ? "alert" : "status");
  element.textContent = message;
  element.title = "click to dismiss";
  element.addEventListener("click", () => element.remove());
  document.getElementById("toasts").append(element);
  setTimeout(() => element.remove(), ms);
  return element;
}

/** Put text on the clipboard; resolves to whether that worked. The Clipboard API needs a secure context (an
 * address other than localhost over plain HTTP is not one), so a selected hidden textarea is the fallback. */
export async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch (error) {
      // refused (no permission, page not focused): try the fallback
    }
  }
  const area = el("textarea", { readonly: true, className: "copy-buffer", "aria-hidden": "true" });
  area.value = text;
  document.body.append(area);
  area.select();
  let copied = false;
  try {
    copied = document.execCommand("copy");
  } catch (error) {
    copied = false;
  }
  area.remove();
  return copied;
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
