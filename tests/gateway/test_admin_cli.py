"""`pointsman admin ...` against a stand-in for the admin API: what it sends, and what it prints."""

from __future__ import annotations

import re

import pytest

from gateway import admin_cli
from gateway.cli import main


@pytest.fixture
def calls(monkeypatch):
    """The admin API calls made, answered with `calls.answer`."""
    made = []

    def call(args, method, path, body=None, query=None):  # noqa: ANN001, ANN202
        made.append((method, path, body))
        return calls_answer[0]

    calls_answer = [None]
    monkeypatch.setattr(admin_cli, "_call", call)
    return made, calls_answer


def test_clients_text_in_a_table_cannot_drive_the_terminal_or_add_rows(calls, capsys):
    made, answer = calls
    evil = "m\x1b[2J\x1b]0;title\x07\rFAKE\nteam-x  1  2\x7f\x9b\u202eok"
    totals = {"requests": 1, "errors": 0}
    answer[0] = {"since": "a", "until": "b", "group_by": "model", "totals": totals,
                 "groups": [{"key": evil, **totals}, {"key": ["x\ny"], **totals}]}
    assert main(["admin", "usage", "--group-by", "model"]) == 0
    out = capsys.readouterr().out
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u202e]", out)  # only the table's own newlines
    lines = out.splitlines()
    assert len(lines) == 8  # window, header, total, blank, "by model:", header, two groups
    assert lines[-2].startswith(r"m\x1b[2J\x1b]0;title\x07\rFAKE\nteam-x  1  2\x7f\x9b\u202eok ")
    assert lines[-1].startswith(r"x\ny ")


@pytest.mark.parametrize("models", ["", " , "])
def test_keys_create_with_no_models_asks_for_none_not_all(calls, models):
    made, answer = calls
    answer[0] = {}
    assert main(["admin", "keys", "create", "--models", models]) == 0
    assert made == [("POST", "/admin/keys", {"role": "user", "models": []})]  # the gateway refuses it (400)
    made.clear()
    main(["admin", "keys", "create"])
    assert made == [("POST", "/admin/keys", {"role": "user"})]  # no --models: all ("*")


@pytest.mark.parametrize("url", ["localhost", "http://127.0.0.1:80x"])
def test_a_malformed_url_is_one_error_line_not_a_traceback(url, capsys):
    """No scheme, or a bad port: urllib's ValueError and InvalidURL went uncaught (a traceback)."""
    assert main(["admin", "keys", "list", "--url", url, "--key", "k"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pointsman: ") and "Traceback" not in err and len(err.splitlines()) == 1


def test_an_answer_that_is_not_json_is_one_error_line(capsys):
    """A proxy's HTML page where the gateway should be: json.loads' error went uncaught."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html>captive portal</html>")

        def log_message(self, *args) -> None:  # noqa: ANN002
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert main(["admin", "keys", "list", "--url", url, "--key", "k"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("pointsman: ") and "did not answer JSON" in err
    finally:
        server.shutdown()
        server.server_close()
