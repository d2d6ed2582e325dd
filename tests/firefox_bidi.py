"""Drive Debian's stock Firefox over WebDriver BiDi, the W3C protocol Firefox serves itself.

Playwright drives only its own patched Firefox build, which cannot be downloaded here, and Debian ships no
geckodriver; Firefox's built-in BiDi endpoint needs neither. This is the small part of the protocol the page's
tests use: navigate, evaluate script, collect console and script errors, take screenshots.
"""
import base64
import json
import os
import re
import shutil
import subprocess
import time

import websocket

FIREFOX = shutil.which("firefox-esr") or shutil.which("firefox")
# No first-run pages, update checks, telemetry or remote settings: the machine has no network, and each of
# these would otherwise log errors or open tabs of its own.
PREFS = {
    "browser.shell.checkDefaultBrowser": False,
    "browser.startup.homepage_override.mstone": "ignore",
    "browser.aboutwelcome.enabled": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "toolkit.telemetry.reportingpolicy.firstRun": False,
    "app.update.disabledForTesting": True,
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
    "services.settings.server": "http://127.0.0.1:9/",
    "extensions.update.enabled": False,
    "browser.safebrowsing.update.enabled": False,
    "browser.download.dir": "",
}


class BiDiError(Exception):
    pass


class Firefox:
    """One headless Firefox with one BiDi session and its first tab."""

    def __init__(self, profile_dir, timeout=60.0):
        os.makedirs(profile_dir, exist_ok=True)
        with open(os.path.join(profile_dir, "user.js"), "w") as f:
            f.writelines(f"user_pref({json.dumps(k)}, {json.dumps(v)});\n" for k, v in PREFS.items())
        # Firefox's own log goes to a file: a pipe nobody reads would fill up and stall the browser.
        self.log_path = os.path.join(profile_dir, "firefox.log")
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [FIREFOX, "--headless", "--no-remote", "--remote-debugging-port", "0", "--profile", profile_dir,
                 "about:blank"], stdout=subprocess.DEVNULL, stderr=log)
        self.timeout, self.events, self._next_id = timeout, [], 0
        # Firefox refuses a handshake that carries an Origin header (web pages may not drive the browser).
        self.socket = websocket.create_connection(self._endpoint() + "/session", timeout=timeout,
                                                  suppress_origin=True)
        self.command("session.new", {"capabilities": {"alwaysMatch": {
            "unhandledPromptBehavior": {"default": "ignore"}}}})  # the tests answer prompts themselves
        self.command("session.subscribe", {"events": ["log.entryAdded", "browsingContext.userPromptOpened"]})
        self.context = self.command("browsingContext.getTree", {})["contexts"][0]["context"]

    def _endpoint(self):
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            with open(self.log_path) as log:
                match = re.search(r"WebDriver BiDi listening on (ws://\S+)", log.read())
            if match:
                return match.group(1)
            time.sleep(0.1)
        raise BiDiError(f"Firefox did not open its BiDi endpoint (exit code {self.process.poll()})")

    def command(self, method, params):
        self._next_id += 1
        command_id = self._next_id
        self.socket.send(json.dumps({"id": command_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("type") == "event":
                self.events.append(message)
            elif message.get("id") == command_id:
                if message.get("type") == "error":
                    raise BiDiError(f"{method}: {message.get('error')}: {message.get('message')}")
                return message["result"]

    def _pump(self, seconds):
        """Read events for up to `seconds` (no command pending)."""
        self.socket.settimeout(seconds)
        try:
            message = json.loads(self.socket.recv())
            if message.get("type") == "event":
                self.events.append(message)
        except websocket.WebSocketTimeoutException:
            pass
        finally:
            self.socket.settimeout(self.timeout)

    # ---- the page

    def set_viewport(self, width, height):
        self.command("browsingContext.setViewport",
                     {"context": self.context, "viewport": {"width": width, "height": height}})

    def goto(self, url):
        self.command("browsingContext.navigate", {"context": self.context, "url": url, "wait": "complete"})

    def evaluate(self, expression):
        """Value of a JavaScript expression (awaited if a promise); strings, numbers, booleans, null."""
        result = self.command("script.evaluate", {"expression": expression, "target": {"context": self.context},
                                                  "awaitPromise": True})
        if result["type"] == "exception":
            raise BiDiError(f"{expression}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression, timeout=None, what=None):
        """Poll a JavaScript expression until it is truthy; its value."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            self._pump(0.1)
        raise AssertionError(f"timed out waiting for {what or expression}")

    def click(self, selector):
        """Click after the current script returns, so a prompt the click opens cannot block this command."""
        self.evaluate(f"setTimeout(() => document.querySelector({json.dumps(selector)}).click(), 0), true")

    def errors(self):
        """Console errors and uncaught script errors logged so far."""
        return [e["params"].get("text", "") for e in self.events
                if e["method"] == "log.entryAdded" and e["params"].get("level") == "error"]

    def screenshot(self, path):
        data = self.command("browsingContext.captureScreenshot", {"context": self.context})["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def close(self):
        try:
            self.command("session.end", {})
        except (BiDiError, OSError, websocket.WebSocketException):
            pass  # Firefox may already be going away; it is killed below either way
        self.socket.close()
        self.process.kill()
        self.process.wait(10)
