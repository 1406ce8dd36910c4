"""Schemathesis hooks for scripts/fuzz (loaded through SCHEMATHESIS_HOOKS).

The fuzz run's pool is made fresh by scripts/fuzz, which passes what it made
in environment variables. The hooks only steer generated requests towards
objects that exist, so that more of them get past authentication and
lookups; every change is a function of the generated data (and, for
dates, of the clock), so a run is reproducible from its seed:

- the appliance token travels in the body (`appliance.apitoken`), where no
  OpenAPI security scheme can put it: a generated string token is replaced
  by the appliance rack-1's (invalid data, a missing token or one of another
  type, still exercises the 401);
- a check-in's `hold_seconds` above 1 (valid up to 120) becomes 1, so that a
  held check-in cannot stall the run for two minutes;
- an instance report's `instance.name` is set to the name in the path for
  most generated names, so reports get past the name comparison;
- `{id}` of the /v1 instance routes, `{name}` of the user routes (alice or
  dora, never the superuser whose token the run uses) and `{template}` of
  the launch route name an existing instance, user or template for most
  generated values, and so do
  most names in a reservation (`appliance`, `flavor`, `wisp`, `instance`);
- most reservations that name both an offered instance and a flavor slot,
  or both a wisp and a callback, keep only one of them;
- most check-in capacities with `free` above `total` get `free = total`, and
  most reported `expires` and timeline times outside the window the pool
  takes (ten years back to a day ahead) are moved to within it;
- `X-Auth-Cloudauth-Id` of two or more characters becomes the superuser's
  own id (shorter values are kept: empty is ignored by the pool, one
  character exercises the 401);
- a reservation's `callback_url` that starts with `http` becomes
  `http://127.0.0.1:9/start`: the pool fetches a reserved instance's callback
  when its appliance reports it, and a generated host name would make it look
  the name up and connect to wherever it points. The pool refuses loopback
  callbacks (502) without a lookup or a connection, so nothing but
  127.0.0.1 is ever reached.
"""

import os
import time
import zlib

import schemathesis

APPLIANCE_TOKEN = os.environ["CORRAL_FUZZ_APPLIANCE_TOKEN"]
SUPERUSER_ID = os.environ["CORRAL_FUZZ_SUPERUSER_ID"]
INSTANCES = os.environ.get("CORRAL_FUZZ_INSTANCES", "").split()
TEMPLATES = os.environ.get("CORRAL_FUZZ_TEMPLATES", "").split()
USERS = os.environ.get("CORRAL_FUZZ_USERS", "").split()
NAMES = {
    "appliance": os.environ.get("CORRAL_FUZZ_APPLIANCES", "").split(),
    "flavor": os.environ.get("CORRAL_FUZZ_FLAVORS", "").split(),
    "wisp": os.environ.get("CORRAL_FUZZ_WISPS", "").split(),
    "instance": os.environ.get("CORRAL_FUZZ_OFFERS", "").split(),
}
LOOPBACK_CALLBACK = "http://127.0.0.1:9/start"


def _pick(value, choices):
    """One of `choices` for three in four values (chosen by the value's
    CRC-32, so the same value always maps the same way), else None."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not choices or not isinstance(value, str) or value == "":
        return None
    digest = zlib.crc32(value.encode("utf-8", "surrogatepass"))
    if digest % 4 == 0:
        return None
    return choices[digest % len(choices)]


@schemathesis.hook
def before_call(context, case, kwargs):
    body = case.body
    if isinstance(body, dict):
        block = body.get("appliance")
        if isinstance(block, dict) and isinstance(block.get("apitoken"), str):
            block["apitoken"] = APPLIANCE_TOKEN
        callback = body.get("callback_url")
        if isinstance(callback, str) and callback[:4].lower() == "http":
            body["callback_url"] = LOOPBACK_CALLBACK
        if case.path == "/api/v1/bids/":
            # Most requests naming both targets, or both boot sources, keep one.
            instance = body.get("instance")
            if isinstance(instance, str) and (body.get("appliance") is not None or body.get("flavor") is not None):
                keep = _pick(instance, ["instance", "slot", "slot"])
                for field in ["appliance", "flavor", "lease_seconds"] if keep == "instance" else ["instance"] if keep else []:
                    body.pop(field, None)
            callback = body.get("callback_url")
            if isinstance(callback, str) and body.get("wisp") is not None:
                keep = _pick(callback, ["wisp", "callback_url"])
                if keep:
                    body.pop("callback_url" if keep == "wisp" else "wisp", None)
            for field, choices in NAMES.items():
                chosen = _pick(body.get(field), choices)
                if chosen is not None:
                    body[field] = chosen
        stats = body.get("stats")
        if case.path == "/api/v1/broker/" and isinstance(stats, dict):
            for capacity in stats.values():
                if isinstance(capacity, dict):
                    total, free = capacity.get("total"), capacity.get("free")
                    if type(total) is int and type(free) is int and 0 <= total < free and _pick(free, ["fit"]):
                        capacity["free"] = total
        report = body.get("instance")
        if case.path == "/api/v1/instances/{name}/" and isinstance(report, dict):
            now = int(time.time())
            expires = report.get("expires")
            if type(expires) is int and not now - 9 * 365 * 86400 < expires < now + 86400 and _pick(expires, ["move"]):
                report["expires"] = now + 3600
            timeline = report.get("timeline")
            for entry in timeline if isinstance(timeline, list) else []:
                at = entry.get("at") if isinstance(entry, dict) else None
                if type(at) in (int, float) and not now - 9 * 365 * 86400 < at < now + 3600 and _pick(str(at), ["move"]):
                    entry["at"] = now
        hold = body.get("hold_seconds")
        if case.path == "/api/v1/broker/" and type(hold) is int and 1 < hold <= 120:
            body["hold_seconds"] = 1
        instance = body.get("instance")
        name = case.path_parameters.get("name") if case.path_parameters else None
        if (
            case.path == "/api/v1/instances/{name}/"
            and isinstance(instance, dict)
            and isinstance(instance.get("name"), str)
            and isinstance(name, str)
            and _pick(name, ["same"]) is not None
        ):
            instance["name"] = name
    if case.path_parameters:
        if case.path.startswith("/v1/server-instance/{id}"):
            chosen = _pick(case.path_parameters.get("id"), INSTANCES)
            if chosen is not None:
                case.path_parameters["id"] = chosen
        if case.path.startswith("/v1/user/{name}"):
            # Never the superuser whose token the run uses: rotating its token
            # would end the run's access; alice's and dora's may change.
            chosen = _pick(case.path_parameters.get("name"), USERS)
            if chosen is not None:
                case.path_parameters["name"] = chosen
        if case.path == "/api/stream/{template}":
            chosen = _pick(case.path_parameters.get("template"), TEMPLATES)
            if chosen is not None:
                case.path_parameters["template"] = chosen
    if case.headers:
        claimed = case.headers.get("X-Auth-Cloudauth-Id")
        if isinstance(claimed, str) and len(claimed) >= 2:
            case.headers["X-Auth-Cloudauth-Id"] = SUPERUSER_ID
