"""Download a file: resumable over HTTP Range, retried with backoff, verified by sha256.

Bytes stream into ``<dest>.part`` (locked against a second downloader); the file is renamed
onto ``dest`` only when its sha256 matches. Redirects are followed here, one at a time, so a
loop names its URLs and a redirect away from http(s) (``file://`` …) is refused as such.
Credentials in a URL (``user:password@``) never appear in a message.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import requests
import urllib3

from stampbatch.errors import FetchError, StampbatchError, UsageError
from stampbatch.fileio import FileLock, fsync_dir, fsync_file, one_line, sha256_file
from stampbatch.progress import Progress

_HTTP_CHUNK = 1 << 16
_MAX_BACKOFF = 60.0
_MAX_REDIRECTS = 10
_SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")
# Status codes worth another attempt: server-side failures, and the two 4xx that mean "later".
_RETRY_STATUS = frozenset({408, 429})
_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RE = re.compile(r"bytes\s+\*/(\d+)")


def _fail(path: Path | str, problem: str) -> FetchError:
    return FetchError(f"{path}: {problem}")


@dataclass(frozen=True)
class Fetched:
    """Where the verified file is, and whether this call transferred it."""

    path: Path
    downloaded: bool


def redact_url(url: str) -> str:
    """``url`` without the password of its ``user:password@`` part (``user:***@``)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host += f":{parts.port}"
    user = f"{parts.username}:***@" if parts.password is not None else f"{parts.username}@"
    return urllib.parse.urlunsplit(parts._replace(netloc=user + host))


class _Retry(Exception):
    """One attempt failed in a way that another attempt may fix."""


def _describe_network_error(exc: BaseException) -> str:
    if isinstance(exc, (requests.Timeout, urllib3.exceptions.TimeoutError)):
        return "timed out"
    text = one_line(exc, limit=1000)
    errno_text = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if errno_text:
        return errno_text.group(1).strip()
    return one_line(exc)


def _get(session: requests.Session, url: str, headers: dict[str, str],
         timeout: float) -> requests.Response:
    """GET ``url``, following redirects one at a time (refusing loops and non-http targets)."""
    chain = [url]
    for _ in range(_MAX_REDIRECTS + 1):
        try:
            resp = session.get(chain[-1], headers=headers, stream=True, timeout=(timeout, timeout),
                               allow_redirects=False)
        except requests.exceptions.InvalidURL as exc:
            raise UsageError(f"{chain[-1]}: invalid URL ({one_line(exc)})") from exc
        except (requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema) as exc:
            raise UsageError(f"{chain[-1]}: not an http(s) URL") from exc
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise _Retry(_describe_network_error(exc)) from exc
        if not resp.is_redirect:
            return resp
        target = urllib.parse.urljoin(chain[-1], resp.headers["Location"])
        resp.close()
        if urllib.parse.urlsplit(target).scheme not in ("http", "https"):
            raise FetchError(f"{url}: redirected to {target}, which is not an http(s) URL; "
                             f"refusing to follow it")
        if target in chain:
            raise FetchError(f"{url}: redirect loop ({' -> '.join([*chain, target])})")
        chain.append(target)
    raise FetchError(f"{url}: more than {_MAX_REDIRECTS} redirects ({chain[1]} -> … -> "
                     f"{chain[-1]})")


def _attempt(session: requests.Session, url: str, part_fh: IO[bytes], offset: int,
             timeout: float, bar: Progress) -> int | None:
    """Fetch bytes from ``offset`` into the partial file; return the total size if known.

    Raises :class:`_Retry` for failures another attempt may fix, :class:`FetchError` for
    those it will not. Returns ``None`` for the total when the server did not say.
    """
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with _get(session, url, headers, timeout) as resp:
        code = resp.status_code
        if code == 416:
            match = _UNSATISFIED_RE.search(resp.headers.get("Content-Range", ""))
            size = int(match.group(1)) if match else None
            if size is not None and size == offset:
                return size  # the partial file already holds every byte
            part_fh.truncate(0)
            part_fh.seek(0)
            raise _Retry(f"HTTP 416 for bytes {offset}- (server has {size} bytes); restarting")
        if code >= 500 or code in _RETRY_STATUS:
            raise _Retry(f"HTTP {code} {resp.reason}")
        if code >= 400:
            raise FetchError(f"{url}: HTTP {code} {resp.reason}")
        if code not in (200, 206):
            raise FetchError(f"{url}: unexpected HTTP {code} {resp.reason}")
        return _receive(resp, url, part_fh, offset, bar)


def _receive(resp: requests.Response, url: str, part_fh: IO[bytes], offset: int,
             bar: Progress) -> int | None:
    """Write a 200/206 body into the partial file at the right place; the total if known."""
    length = resp.headers.get("Content-Length")
    body_bytes = int(length) if length and length.isdigit() else None
    if resp.status_code == 206:
        match = _CONTENT_RANGE_RE.search(resp.headers.get("Content-Range", ""))
        if match is None:
            raise FetchError(f"{url}: HTTP 206 without a usable Content-Range header")
        start = int(match.group(1))
        total = int(match.group(3)) if match.group(3) != "*" else None
        if start > offset:
            part_fh.truncate(0)
            part_fh.seek(0)
            raise _Retry(f"server resumed at byte {start}, not {offset}; restarting")
        pos = start
    else:  # 200: the whole file (a server that ignores Range starts from byte 0 again)
        pos = 0
        total = body_bytes
    part_fh.truncate(pos)
    part_fh.seek(pos)
    bar.total = total
    bar.done = pos
    expected_end = total if total is not None else (
        pos + body_bytes if body_bytes is not None else None)
    try:
        for data in _body_chunks(resp):
            part_fh.write(data)
            pos += len(data)
            bar.update(len(data))
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        part_fh.flush()
        raise _Retry(f"connection dropped at byte {pos:,}"
                     + (f" of {expected_end:,}" if expected_end else "")
                     + f" ({_describe_network_error(exc)})") from exc
    part_fh.flush()
    if expected_end is not None and pos != expected_end:
        raise _Retry(f"connection dropped at byte {pos:,} of {expected_end:,}")
    return total if total is not None else pos


def _body_chunks(resp: requests.Response) -> Iterator[bytes]:
    """The body bytes as sent (no content decoding: Range offsets count these bytes).

    ``read1`` hands over whatever has arrived, so bytes received before a stall are saved
    before the read timeout fires and are not fetched again.
    """
    read1 = getattr(resp.raw, "read1", None)
    if read1 is None:  # urllib3 < 2.3
        yield from resp.raw.stream(_HTTP_CHUNK, decode_content=False)
        return
    while data := read1(_HTTP_CHUNK, decode_content=False):
        yield data


@contextlib.contextmanager
def _locked_partial(part: Path) -> Iterator[IO[bytes]]:
    """Open (creating if needed) the partial download, locked against a second downloader
    (the lock is on the ``.part`` itself: nothing is written into it but the download)."""
    lock = FileLock(part, record=False, remove=False,
                    busy=lambda _: _fail(part, "another download into this file is running"),
                    failed=lambda exc: _fail(part, f"cannot open the partial download ({one_line(exc)})"))
    with lock:
        try:
            fh = open(part, "r+b")
        except OSError as exc:
            raise _fail(part, f"cannot open the partial download ({one_line(exc)})") from exc
        try:
            fh.seek(0, os.SEEK_END)
            yield fh
        except BaseException:
            # An empty partial is of no use to a later resume: do not leave it lying around.
            with contextlib.suppress(OSError):
                if part.exists() and os.fstat(fh.fileno()).st_size == 0:
                    part.unlink()
            raise
        finally:
            fh.close()


def _check_arguments(url: str, sha256: str, retries: int, timeout: float) -> str:
    """The expected digest (lower case), or a UsageError naming the bad argument."""
    if not isinstance(sha256, str) or not _SHA256_RE.fullmatch(sha256.strip()):
        raise UsageError(f"--sha256 must be 64 hexadecimal digits, got {str(sha256)[:80]!r}")
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise UsageError(f"{url}: not an http(s) URL")
    if retries < 0:
        raise UsageError(f"--retries must be 0 or more, got {retries}")
    if not (math.isfinite(timeout) and timeout > 0):
        raise UsageError(f"--timeout must be a positive number of seconds, got {timeout}")
    return sha256.strip().lower()


def fetch_url(
    url: str,
    dest: Path | str,
    sha256: str,
    *,
    retries: int = 5,
    timeout: float = 30.0,
    overwrite: bool = False,
    progress: bool = True,
    backoff: float = 0.5,
    session: requests.Session | None = None,
) -> Fetched:
    """Download ``url`` to ``dest``, resumable, and verified by its sha256.

    Bytes stream into ``<dest>.part``; an interrupted transfer (this run or an earlier one)
    resumes with an HTTP Range request, and a server that ignores Range restarts from byte 0.
    Connection errors, timeouts (``timeout`` seconds without data) and 5xx answers are retried
    with exponential backoff until ``retries`` attempts in a row fail to bring the file past
    the most bytes it ever held; other 4xx answers fail at once. The file is renamed onto
    ``dest`` only when its sha256 matches; on a mismatch it is deleted. An existing ``dest``
    with the right digest is kept without contacting the server (``downloaded=False``).
    """
    try:
        return _fetch(url, Path(dest), _check_arguments(url, sha256, retries, timeout),
                      retries=retries, timeout=timeout, overwrite=overwrite, progress=progress,
                      backoff=backoff, session=session)
    except StampbatchError as exc:
        text = str(exc)
        for raw in {url, *re.findall(r"\S+://\S+", text)}:
            text = text.replace(raw, redact_url(raw))
        if text == str(exc):
            raise
        raise type(exc)(text) from None


def download(url: str, dest: Path | str, sha256: str, **options) -> Path:  # noqa: ANN003
    """:func:`fetch_url`, returning only the path (options as there)."""
    return fetch_url(url, dest, sha256, **options).path


def _fetch(url: str, dest: Path, expected: str, *, retries: int, timeout: float,
           overwrite: bool, progress: bool, backoff: float,
           session: requests.Session | None) -> Fetched:
    parent = dest.parent if str(dest.parent) else Path(".")
    if dest.is_dir():
        raise _fail(dest, "is a directory")
    if dest.exists():
        actual = sha256_file(dest)
        if actual == expected:
            return Fetched(dest, downloaded=False)
        if not overwrite:
            raise _fail(dest, f"already exists with sha256 {actual}, not {expected} "
                              f"(pass --overwrite to replace it)")
    if not parent.is_dir():
        raise _fail(dest, f"directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise _fail(dest, f"directory {parent} is not writable")

    part = dest.with_name(dest.name + ".part")
    own_session = session is None
    session = session or requests.Session()
    try:
        with _locked_partial(part) as fh:
            resumed_stale = fh.tell() > 0
            while True:
                _transfer(session, url, fh, retries=retries, timeout=timeout, backoff=backoff,
                          progress=progress, label=f"fetch {dest.name}")
                actual = sha256_file(part)
                if actual == expected:
                    break
                if resumed_stale:
                    # The partial left by an earlier run may belong to another file: start over.
                    resumed_stale = False
                    fh.truncate(0)
                    fh.seek(0)
                    continue
                part.unlink(missing_ok=True)
                raise FetchError(f"{url}: sha256 mismatch: expected {expected}, got {actual}; "
                                 f"the download was discarded")
            fh.flush()
            fsync_file(part)
            os.replace(part, dest)
    finally:
        if own_session:
            session.close()
    fsync_dir(parent)
    return Fetched(dest, downloaded=True)


def _transfer(session: requests.Session, url: str, fh: IO[bytes], *, retries: int,
              timeout: float, backoff: float, progress: bool, label: str) -> None:
    """Bring the partial file to the complete download, retrying with backoff.

    Progress means holding more bytes than ever before: a server that cuts the body short
    and then refuses the Range request (416) makes every attempt restart from byte 0, which
    must count as a failure, or the loop never ends.
    """
    failures = 0
    best = fh.seek(0, os.SEEK_END)
    with Progress(None, label, "MiB", enabled=progress, scale=float(1 << 20)) as bar:
        while True:
            try:
                _attempt(session, url, fh, fh.seek(0, os.SEEK_END), timeout, bar)
                return
            except _Retry as exc:
                size = fh.seek(0, os.SEEK_END)
                failures = 0 if size > best else failures + 1
                best = max(best, size)
                if failures > retries:
                    raise FetchError(f"{url}: gave up after {retries + 1} attempts without "
                                     f"progress ({exc})") from exc
                time.sleep(min(backoff * 2 ** max(failures - 1, 0), _MAX_BACKOFF))
