"""Downloads against a real HTTP server on 127.0.0.1: the hostile-server findings of issue 9
(416 after a cut body, redirect loops, redirects to file://, credentials in URLs) and the
``stampbatch fetch`` command's arguments and messages."""

from __future__ import annotations

import hashlib
import http.server
import threading
import time
from pathlib import Path

import pytest

from stampbatch import cli
from stampbatch.errors import FetchError
from stampbatch.ingest import download

BODY = bytes(range(256)) * 400  # 102,400 bytes
SHA = hashlib.sha256(BODY).hexdigest()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args) -> None:
        pass

    def _reply(self, status: int, headers: dict[str, str], body: bytes = b"",
               length: int | None = None) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        if length is not None and length != len(body):
            self.close_connection = True

    def do_GET(self) -> None:
        mode = self.server.mode  # type: ignore[attr-defined]
        self.server.seen.append((self.path, self.headers.get("Range")))  # type: ignore[attr-defined]
        if self.path == "/loop-a":
            return self._reply(302, {"Location": "/loop-b"})
        if self.path == "/loop-b":
            return self._reply(302, {"Location": "/loop-a"})
        if self.path == "/to-file":
            return self._reply(302, {"Location": "file:///etc/passwd"})
        if self.path == "/missing":
            return self._reply(404, {}, b"no")
        if mode == "cut-then-416":
            if self.headers.get("Range"):
                return self._reply(416, {"Content-Range": "bytes */999999"})
            return self._reply(200, {}, BODY[:5000], length=len(BODY))
        return self._reply(200, {}, BODY)


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    srv.mode, srv.seen = "plain", []  # type: ignore[attr-defined]
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", srv
    finally:
        srv.shutdown()
        srv.server_close()


FAST = {"backoff": 0.01, "progress": False, "timeout": 5.0}


def test_cut_body_then_416_gives_up_after_the_retries(tmp_path: Path, server) -> None:
    """Each retry restarted from byte 0 and counted the same 5,000 bytes as progress again:
    the loop never ended. Progress now means more bytes than ever held."""
    base, srv = server
    srv.mode = "cut-then-416"
    t0 = time.monotonic()
    with pytest.raises(FetchError, match="gave up after 3 attempts without progress"):
        download.fetch_url(f"{base}/f", tmp_path / "f.bin", SHA, retries=2, **FAST)
    assert time.monotonic() - t0 < 20
    assert len(srv.seen) <= 8
    assert not (tmp_path / "f.bin").exists()


def test_redirect_loop_names_the_urls(tmp_path: Path, server) -> None:
    base, _ = server
    with pytest.raises(FetchError) as err:
        download.fetch_url(f"{base}/loop-a", tmp_path / "f.bin", SHA, **FAST)
    assert str(err.value) == (f"{base}/loop-a: redirect loop ({base}/loop-a -> {base}/loop-b -> "
                              f"{base}/loop-a)")


def test_redirect_to_file_url_is_called_what_it_is(tmp_path: Path, server) -> None:
    base, _ = server
    with pytest.raises(FetchError) as err:
        download.fetch_url(f"{base}/to-file", tmp_path / "f.bin", SHA, **FAST)
    assert str(err.value) == (f"{base}/to-file: redirected to file:///etc/passwd, which is not "
                              f"an http(s) URL; refusing to follow it")


def test_password_in_url_is_never_printed(tmp_path: Path, server, capsys) -> None:
    base, _ = server
    secret = base.replace("http://", "http://alice:s3cr3t@")
    for path in ("/missing", "/loop-a", "/to-file"):
        rc = cli.main(["fetch", f"{secret}{path}", str(tmp_path / "f.bin"), "--sha256", SHA,
                       "--quiet", "--retries", "0"])
        err = capsys.readouterr().err
        assert rc == 1 and "s3cr3t" not in err and "alice:***@" in err, err
    rc = cli.main(["fetch", f"{secret}/ok", str(tmp_path / "ok.bin"), "--sha256", SHA, "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0 and "s3cr3t" not in out and "alice:***@" in out


def test_existing_matching_dest_is_not_called_downloaded(tmp_path: Path, server, capsys) -> None:
    base, srv = server
    dest = tmp_path / "f.bin"
    dest.write_bytes(BODY)
    assert cli.main(["fetch", f"{base}/missing", str(dest), "--sha256", SHA, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "downloaded" not in out.replace("nothing downloaded", "")
    assert out.strip() == f"{dest} already holds this file (sha256 verified); nothing downloaded"
    assert srv.seen == []


@pytest.mark.parametrize("value", ["inf", "nan", "0", "-1", "-inf", "1e400", "soon"])
def test_timeout_is_checked_at_parse_time(tmp_path: Path, capsys, value) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["fetch", "http://127.0.0.1:9/f", str(tmp_path / "f"), "--sha256", SHA,
                  f"--timeout={value}"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "--timeout" in err
    assert list(tmp_path.iterdir()) == []


def test_timeout_inf_from_python_is_refused_too(tmp_path: Path) -> None:
    with pytest.raises(download.UsageError, match="--timeout must be a positive number"):
        download.fetch_url("http://127.0.0.1:9/f", tmp_path / "f", SHA, timeout=float("inf"))


def test_redact_url() -> None:
    assert download.redact_url("https://u:p@h:8/x?q=1") == "https://u:***@h:8/x?q=1"
    assert download.redact_url("https://u@h/x") == "https://u@h/x"
    assert download.redact_url("https://h/x") == "https://h/x"
