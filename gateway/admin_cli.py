"""`pointsman admin ...`: API keys, models, usage, forecasts and advice, from a running gateway's admin API."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["add_admin_parser"]

DEFAULT_URL = "http://127.0.0.1:8000"
_TIMEOUT_S = 30.0
_BARE_RELATIVE = re.compile(r"^\d+(?:\.\d+)?[smhdw]$")  # "24h": argparse would take "-24h" for an option


class AdminError(Exception):
    """The gateway answered an error, or could not be reached: the message to print."""


def _call(args: argparse.Namespace, method: str, path: str, body: dict | None = None,
          query: dict[str, Any] | None = None) -> Any:
    """One admin API call: the decoded JSON answer, or AdminError with the OpenAI error's message."""
    params = {k: v for k, v in (query or {}).items() if v is not None}
    url = args.url.rstrip("/") + path + (f"?{urllib.parse.urlencode(params)}" if params else "")
    headers = {"accept": "application/json"}
    if args.key:
        headers["authorization"] = f"Bearer {args.key}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["content-type"] = "application/json"
    try:
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            message = json.loads(raw)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = raw.decode(errors="replace").strip() or exc.reason
        raise AdminError(f"HTTP {exc.code}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise AdminError(f"cannot reach {args.url}: {reason}") from None
    except (ValueError, http.client.HTTPException) as exc:  # no scheme, a bad port (InvalidURL), a broken answer
        raise AdminError(f"cannot call {args.url!r}: {exc}") from None
    try:
        return json.loads(raw or b"null")
    except ValueError:  # a proxy's HTML page, say
        raise AdminError(f"{args.url} did not answer JSON (is --url the gateway?)") from None


# ---- output


def _printable(text: str) -> str:
    """`text` with each character a terminal would act on (C0 and C1 controls such as ESC, BEL, CR and LF; DEL;
    format characters such as bidi overrides) written as its Python escape: a cell is the gateway's clients' text
    (a model name, a team), never escape sequences or a row of its own."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return ",".join(_cell(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))  # ASCII, controls escaped
    return _printable(str(value))


def _table(rows: Sequence[dict], columns: Sequence[str], empty: str = "(none)") -> str:
    """Rows as aligned columns under a header; `empty` when there are none."""
    if not rows:
        return empty
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [[c.upper() for c in columns], *cells]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def _pairs(data: dict) -> str:
    width = max((len(k) for k in data), default=0)
    return "\n".join(f"{k.ljust(width)}  {_cell(v)}" for k, v in data.items())


# ---- commands: each returns (the JSON answer, how to print it as text)

Result = tuple[Any, Callable[[Any], str]]


def _keys_create(args: argparse.Namespace) -> Result:
    # --models "" is no models (refused by the gateway, as " , " is), not the default: all of them
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models is not None else None
    body = {"role": args.role, "team": args.team, "name": args.name, "models": models}
    answer = _call(args, "POST", "/admin/keys", {k: v for k, v in body.items() if v is not None})
    return answer, lambda a: json.dumps(a, indent=2)  # the secret is shown this once: keep every field


def _keys_list(args: argparse.Namespace) -> Result:
    answer = _call(args, "GET", "/admin/keys", query={"revoked": "true" if args.revoked else None})
    return answer, lambda a: _table(a["data"], ["id", "name", "role", "team", "models", "hint", "created_at",
                                                "expires_at", "revoked_at"], "(no keys)")


def _keys_revoke(args: argparse.Namespace) -> Result:
    answer = _call(args, "DELETE", f"/admin/keys/{urllib.parse.quote(args.id, safe='')}")
    return answer, _pairs


def _models_list(args: argparse.Namespace) -> Result:
    def text(answer: Any) -> str:
        rows = [{"id": m["id"], **{k: (m.get("pointsman") or {}).get(k) for k in ("status", "backend", "in_flight")}}
                for m in answer["data"]]
        return _table(rows, ["id", "status", "backend", "in_flight"], "(no models)")

    return _call(args, "GET", "/v1/models"), text


def _models_action(args: argparse.Namespace) -> Result:
    answer = _call(args, "POST", f"/admin/models/{urllib.parse.quote(args.id, safe='')}/{args.action}")
    return answer, lambda a: _pairs({"id": a.get("id"), **(a.get("pointsman") or {})})


def _models_reload(args: argparse.Namespace) -> Result:
    def text(answer: Any) -> str:
        # restart_required: the changed sections a reload does not apply (policies, auth...), shown only when some
        shown = {k: v for k, v in answer.items() if k != "object" and (k != "restart_required" or v)}
        lines = _pairs(shown)
        if answer.get("restart_required"):
            lines += "\nthese sections take effect only when the gateway restarts (with several workers: SIGHUP)"
        return lines

    return _call(args, "POST", "/admin/reload"), text


def _relative(value: str | None) -> str | None:
    return f"-{value}" if value is not None and _BARE_RELATIVE.match(value) else value


_METRICS = ["requests", "errors", "prompt_tokens", "completion_tokens", "cost_usd", "latency_ms_p50",
            "latency_ms_p95", "cache_hit_rate"]


def _usage(args: argparse.Namespace) -> Result:
    answer = _call(args, "GET", "/admin/analytics", query={"since": _relative(args.since),
                                                           "until": _relative(args.until), "group_by": args.group_by})

    def text(a: Any) -> str:
        out = [f"{a['since']} .. {a['until']}" + (" (percentiles sampled)" if a.get("sampled") else ""),
               _table([{"key": "total", **a["totals"]}], ["key", *_METRICS])]
        if a["group_by"]:
            out += ["", f"by {a['group_by']}:", _table(a["groups"], ["key", *_METRICS], "(no requests)")]
        return "\n".join(out)

    return answer, text


def _forecast(args: argparse.Namespace) -> Result:
    return _call(args, "GET", "/admin/analytics/forecast"), lambda a: _table(
        a["data"], ["budget", "scope", "member", "period", "kind", "used", "limit", "rate_per_hour", "projected",
                    "alert", "runs_out_at"], "(no budgets)")


def _recommendations(args: argparse.Namespace) -> Result:
    answer = _call(args, "GET", "/admin/analytics/recommendations",
                   query={"since": _relative(args.since), "until": _relative(args.until),
                          "min_requests": args.min_requests, "team": args.team, "key_id": args.key_id})
    return answer, lambda a: _table(
        a["data"], ["task", "from_model", "to_model", "requests", "current_cost_usd", "projected_cost_usd",
                    "savings_usd", "savings_pct", "from_capability", "to_capability"], "(no cheaper model found)")


def _run(command: Callable[[argparse.Namespace], Result]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            answer, text = command(args)
        except AdminError as exc:
            print(f"pointsman: {exc}", file=sys.stderr)
            return 1
        print(json.dumps(answer, indent=2) if args.json else text(answer))
        return 0

    return run


def add_admin_parser(commands: Any) -> None:
    """Add `admin` and its commands to the `pointsman` subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("POINTSMAN_URL") or DEFAULT_URL,
                        help=f"the gateway (env POINTSMAN_URL; default {DEFAULT_URL})")
    common.add_argument("--key", default=os.environ.get("POINTSMAN_ADMIN_KEY"),
                        help="an admin API key (env POINTSMAN_ADMIN_KEY)")
    common.add_argument("--json", action="store_true", help="print the raw JSON answer")
    window = argparse.ArgumentParser(add_help=False)
    window.add_argument("--since", help="ISO 8601 or relative: 24h, 7d (or --since=-24h); default: 24h ago")
    window.add_argument("--until", help="ISO 8601 or relative; default: now")

    admin = commands.add_parser("admin", help="manage a running gateway: keys, models, usage, forecasts")
    groups = admin.add_subparsers(dest="admin_command", required=True)

    keys = groups.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    create = keys.add_parser("create", parents=[common], help="create a key (its secret is printed only now)")
    create.add_argument("--role", default="user", choices=["admin", "user", "readonly"])
    create.add_argument("--team")
    create.add_argument("--name")
    create.add_argument("--models", help="comma-separated model globs; default: all ('*')")
    create.set_defaults(func=_run(_keys_create))
    listed = keys.add_parser("list", parents=[common], help="list keys (never their secrets)")
    listed.add_argument("--revoked", action="store_true", help="include revoked keys")
    listed.set_defaults(func=_run(_keys_list))
    revoke = keys.add_parser("revoke", parents=[common], help="revoke a key by its id")
    revoke.add_argument("id")
    revoke.set_defaults(func=_run(_keys_revoke))

    models = groups.add_parser("models", help="served models").add_subparsers(dest="models_command", required=True)
    models.add_parser("list", parents=[common], help="list the served models").set_defaults(func=_run(_models_list))
    for action in ("load", "unload"):
        one = models.add_parser(action, parents=[common], help=f"{action} a local model")
        one.add_argument("id")
        one.set_defaults(func=_run(_models_action), action=action)
    models.add_parser("reload", parents=[common], help="reload the config file").set_defaults(
        func=_run(_models_reload))

    usage = groups.add_parser("usage", parents=[common, window], help="requests, tokens, cost and latency")
    usage.add_argument("--group-by", help="model, task, team, route, key, user or status")
    usage.set_defaults(func=_run(_usage))
    groups.add_parser("forecast", parents=[common], help="budget spend forecasts").set_defaults(
        func=_run(_forecast))
    advice = groups.add_parser("recommendations", parents=[common, window],
                               help="cheaper models about as capable, per task")
    advice.add_argument("--min-requests", type=int, help="answered requests a task and model need (default 10)")
    advice.add_argument("--team", help="only this team's traffic")
    advice.add_argument("--key-id", help="only this API key's traffic (its id, as `keys list` shows it)")
    advice.set_defaults(func=_run(_recommendations))
