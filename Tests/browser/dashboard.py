#!/usr/bin/python3
"""Drives the pool's /ui dashboard in real headless Chromium (Debian's), over
the DevTools protocol (python3-websocket), as a superuser would use it.

Usage: dashboard.py POOL_URL SETUP_JSON SCREENSHOT_DIR

SETUP_JSON names the tokens and what to launch: {"root": TOKEN, "alice":
TOKEN, "appliance": TOKEN, "image": NAME, "flavor": NAME}. Every request
goes to POOL_URL, a loopback address. Prints one JSON object with what the
browser showed; the caller asserts on it. Every wait is bounded.
"""
import json, os, shutil, subprocess, sys, tempfile, time, urllib.request

import websocket  # Debian's python3-websocket

pool, setup, shots = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
assert pool.startswith("http://127.0.0.1:"), "loopback only"
seen = {}


def api(method, path, token=None, body=None):
    request = urllib.request.Request(pool + path, method=method, data=None if body is None else json.dumps(body).encode())
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("X-Auth-Token", token)
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


profile = tempfile.mkdtemp(prefix="corral-chromium-")
browser = subprocess.Popen(
    ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
     "--remote-debugging-port=0", "--remote-allow-origins=*", "--user-data-dir=" + profile, "--window-size=1280,800",
     "about:blank"],
    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    port_file = os.path.join(profile, "DevToolsActivePort")
    deadline = time.time() + 60
    while not os.path.exists(port_file) or not open(port_file).read().strip():
        if time.time() > deadline or browser.poll() is not None:
            raise SystemExit("chromium did not start its DevTools endpoint within 60 s")
        time.sleep(0.1)
    devtools_port = open(port_file).read().split()[0]
    targets = json.load(urllib.request.urlopen("http://127.0.0.1:%s/json/list" % devtools_port, timeout=30))
    page = next(t for t in targets if t["type"] == "page")
    socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
    counter = [0]

    def cdp(method, **params):
        counter[0] += 1
        socket.send(json.dumps({"id": counter[0], "method": method, "params": params}))
        deadline = time.time() + 60
        while time.time() < deadline:
            message = json.loads(socket.recv())
            if message.get("id") == counter[0]:
                if "error" in message:
                    raise RuntimeError("%s: %s" % (method, message["error"]))
                return message.get("result", {})
        raise RuntimeError(method + " got no answer within 60 s")

    def js(expression):
        result = cdp("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError("script failed: %s" % result["exceptionDetails"])
        return result["result"].get("value")

    def wait_for(expression, seconds=30):
        deadline = time.time() + seconds
        while time.time() < deadline:
            value = js(expression)
            if value:
                return value
            time.sleep(0.2)
        return None

    def load(url):
        cdp("Page.navigate", url=url)
        wait_for("document.readyState === 'complete'")

    def screenshot(name, width, height):
        cdp("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=width < 600)
        time.sleep(0.5)
        data = cdp("Page.captureScreenshot", format="png")["data"]
        import base64
        with open(os.path.join(shots, name), "wb") as file:
            file.write(base64.b64decode(data))
        cdp("Emulation.clearDeviceMetricsOverride")

    cdp("Page.enable")
    cdp("Network.enable")
    # A wrong token is refused on the login page.
    load(pool + "/ui")
    seen["login_form"] = js("!!document.querySelector('form.login #token')")
    js("document.getElementById('token').value = 'not-a-token'; document.querySelector('form.login').submit(); true")
    time.sleep(1)
    wait_for("document.readyState === 'complete'")
    seen["wrong_token"] = js("(document.getElementById('problem') || {}).textContent || ''")
    # alice's token is no superuser's.
    js("document.getElementById('token').value = %s; document.querySelector('form.login').submit(); true" % json.dumps(setup["alice"]))
    time.sleep(1)
    wait_for("document.readyState === 'complete'")
    seen["user_token"] = js("(document.getElementById('problem') || {}).textContent || ''")
    # root logs in.
    js("document.getElementById('token').value = %s; document.querySelector('form.login').submit(); true" % json.dumps(setup["root"]))
    seen["dashboard"] = bool(wait_for("!!document.getElementById('live')"))
    cookies = cdp("Network.getCookies", urls=[pool + "/ui"])["cookies"]
    seen["cookies"] = [{"name": c["name"], "httpOnly": c["httpOnly"], "sameSite": c.get("sameSite"), "secure": c["secure"],
                        "path": c["path"]} for c in cookies]
    seen["appliances"] = js("Array.from(document.querySelectorAll('#appliances td:first-child')).map(e => e.textContent)")
    # Without a reload from here on: the marker would be gone.
    js("window.corralMarker = 42; true")

    requested = time.time()
    status, created = api("POST", "/v1/server-instance", setup["alice"],
                          {"server-image": setup["image"], "server-flavor": setup["flavor"]})
    seen["create_status"] = status
    instance = created["data"][0]
    name = instance["hostname"]
    row = "document.querySelector('tr[data-instance=%s] [data-status]')" % json.dumps(name)
    seen["appeared"] = wait_for("(%s || {}).textContent" % row)
    # The appliance reports it running, with its launch phases (after the request).
    time.sleep(max(0, requested + 1.2 - time.time()))
    phases = [{"phase": p, "at": requested + 0.2 + i * 0.2} for i, p in enumerate(
        ["picked-up", "image-ready", "seed-written", "domain-defined", "domain-started"])]
    report = {"appliance": {"apitoken": setup["appliance"]}, "instance": {"name": name, "state": 4, "timeline": phases}}
    seen["report_status"] = api("POST", "/api/v1/instances/%s/" % name, body=report)[0]
    seen["changed"] = wait_for("((%s || {}).textContent === 'ACTIVE') && 'ACTIVE'" % row)
    seen["marker"] = js("window.corralMarker")
    screenshot("dashboard-wide.png", 1280, 800)
    screenshot("dashboard-narrow.png", 390, 844)
    # Its timeline, one click away.
    js("document.querySelector('tr[data-instance=%s] a').click(); true" % json.dumps(name))
    wait_for("!!document.getElementById('timeline')")
    seen["timeline_url"] = js("location.pathname")
    seen["phases"] = js("Array.from(document.querySelectorAll('#timeline .lane')).map(e => e.dataset.phase)")
    screenshot("dashboard-timeline.png", 1280, 800)
    # Logging out ends the session: /ui/live is refused.
    load(pool + "/ui")
    js("document.querySelector('header form').submit(); true")
    time.sleep(1)
    wait_for("document.readyState === 'complete'")
    seen["after_logout"] = js("fetch('/ui/live').then(r => r.status)")
    socket.close()
finally:
    browser.terminate()
    try:
        browser.wait(timeout=20)
    except subprocess.TimeoutExpired:
        browser.kill()
    shutil.rmtree(profile, ignore_errors=True)
print(json.dumps(seen))
