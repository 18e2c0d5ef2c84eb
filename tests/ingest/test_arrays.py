"""Tests of stampbatch.ingest.arrays: reading stamp arrays, ingest into a store, resumable download.

Downloads go to a real HTTP server on 127.0.0.1 started in a thread by each test; it records
the Range header and the number of body bytes of every request it answered.
"""

from __future__ import annotations

import fcntl
import hashlib
import http.server
import socket
import threading
import time
import tracemalloc
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from conftest import gaussian_stamps

from stampbatch import store
from stampbatch.cli import main
from stampbatch.errors import StampbatchError, UsageError
from stampbatch.ingest import arrays as fetch

# --------------------------------------------------------------------------- helpers


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _one_error_line(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"stampbatch {command}: error: "), err
    return lines[0]


@pytest.fixture
def arrays(tmp_path: Path) -> dict[str, object]:
    """Sources (30, 441) and noise (20, 21, 21) float32 stamps saved as .npy files."""
    src = gaussian_stamps(30, seed=3, sources=np.ones(30, bool))
    nse = gaussian_stamps(20, seed=4)
    np.save(tmp_path / "stamps_sources.npy", src.reshape(30, 441))
    np.save(tmp_path / "stamps_noise.npy", nse)
    return {"sources": tmp_path / "stamps_sources.npy", "noise": tmp_path / "stamps_noise.npy",
            "src": src, "nse": nse}


# --------------------------------------------------------------------------- load_stamp_array


def test_load_flat_rows_become_square_stamps(tmp_path: Path) -> None:
    flat = np.arange(6 * 441, dtype=np.float64).reshape(6, 441) / 7.0
    np.save(tmp_path / "a.npy", flat)
    out = fetch.load_stamp_array(tmp_path / "a.npy")
    assert out.shape == (6, 21, 21) and out.dtype == np.float32
    np.testing.assert_array_equal(out, flat.astype(np.float32).reshape(6, 21, 21))
    assert out.flags.writeable and out.flags.c_contiguous


def test_load_keeps_3d_and_converts_integers(tmp_path: Path) -> None:
    cube = np.arange(4 * 9 * 9, dtype=np.int16).reshape(4, 9, 9) - 100
    np.save(tmp_path / "c.npy", cube)
    out = fetch.load_stamp_array(tmp_path / "c.npy")
    assert out.shape == (4, 9, 9) and out.dtype == np.float32
    np.testing.assert_array_equal(out, cube.astype(np.float32))


def test_load_fortran_order_and_big_endian(tmp_path: Path) -> None:
    flat = np.asfortranarray(np.random.default_rng(0).normal(size=(5, 441))).astype(">f8")
    np.save(tmp_path / "f.npy", flat)
    np.savez(tmp_path / "f.npz", stamps=flat)
    want = flat.astype(np.float32).reshape(5, 21, 21)
    np.testing.assert_array_equal(fetch.load_stamp_array(tmp_path / "f.npy"), want)
    np.testing.assert_array_equal(fetch.load_stamp_array(tmp_path / "f.npz"), want)


def test_load_explicit_stamp_shape(tmp_path: Path) -> None:
    flat = np.arange(3 * 12, dtype=np.float32).reshape(3, 12)
    np.save(tmp_path / "r.npy", flat)
    out = fetch.load_stamp_array(tmp_path / "r.npy", stamp_shape=(3, 4))
    np.testing.assert_array_equal(out, flat.reshape(3, 3, 4))
    with pytest.raises(fetch.FetchError, match=r"rows of 12 values cannot be 5x5"):
        fetch.load_stamp_array(tmp_path / "r.npy", stamp_shape=(5, 5))
    with pytest.raises(fetch.FetchError, match=r"not square"):
        fetch.load_stamp_array(tmp_path / "r.npy")


def test_load_npz_one_and_several_arrays(tmp_path: Path) -> None:
    a = gaussian_stamps(5, seed=1)
    b = gaussian_stamps(7, seed=2).reshape(7, 441)
    np.savez(tmp_path / "one.npz", stamps=a)
    np.savez_compressed(tmp_path / "two.npz", sources=a, noise=b)
    np.testing.assert_array_equal(fetch.load_stamp_array(tmp_path / "one.npz"), a)
    np.testing.assert_array_equal(fetch.load_stamp_array(tmp_path / "two.npz", key="noise"),
                                  b.reshape(7, 21, 21))
    with pytest.raises(fetch.FetchError, match=r"two\.npz: holds 2 arrays \(sources, noise\); "
                                               r"choose one with --key"):
        fetch.load_stamp_array(tmp_path / "two.npz")
    with pytest.raises(fetch.FetchError, match=r"has no array 'x' \(it has: sources, noise\)"):
        fetch.load_stamp_array(tmp_path / "two.npz", key="x")


@pytest.mark.parametrize("suffix", ["npy", "npz"])
def test_pickled_object_array_is_refused_without_unpickling(tmp_path: Path, suffix: str) -> None:
    class Boom:
        def __reduce__(self):  # unpickling this would create a marker file
            return (Path.touch, (tmp_path / "EXECUTED",))

    obj = np.empty(3, dtype=object)
    obj[:] = [Boom(), 1, "x"]
    path = tmp_path / f"evil.{suffix}"
    if suffix == "npy":
        np.save(path, obj, allow_pickle=True)
    else:
        np.savez(path, stamps=obj)
    with pytest.raises(fetch.FetchError) as err:
        fetch.load_stamp_array(path)
    assert str(err.value).startswith(str(path))
    assert "holds Python objects (pickle); refusing to load it" in str(err.value)
    assert not (tmp_path / "EXECUTED").exists()


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((0, 441), np.float32), r"is empty \(shape \(0, 441\)\)"),
        (np.zeros((4, 440), np.float32), r"rows of 440 values are not square stamps"),
        (np.zeros(441, np.float32), r"has shape \(441,\), expected \(N, H\*W\) or \(N, H, W\)"),
        (np.zeros((2, 3, 21, 21), np.float32), r"has shape \(2, 3, 21, 21\)"),
        (np.array([["a"] * 441] * 2), r"non-numeric dtype <U1"),
        (np.zeros((2, 441), bool), r"non-numeric dtype bool"),
        (np.zeros((2, 441), np.complex64), r"non-numeric dtype complex64"),
        (np.zeros(3, dtype=[("x", "f4"), ("y", "f4")]), r"non-numeric dtype"),
    ],
)
def test_bad_arrays_are_refused_with_one_line(tmp_path: Path, array: np.ndarray,
                                              message: str) -> None:
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(fetch.FetchError, match=message) as err:
        fetch.load_stamp_array(path)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


def test_truncated_npy_and_npz(tmp_path: Path) -> None:
    np.save(tmp_path / "t.npy", np.ones((10, 441), np.float32))
    data = (tmp_path / "t.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(data[:-100])
    with pytest.raises(fetch.FetchError, match=r"t\.npy: truncated \.npy file \(17,540 of 17,640"):
        fetch.load_stamp_array(tmp_path / "t.npy")
    (tmp_path / "h.npy").write_bytes(data[:20])  # cut inside the header
    with pytest.raises(fetch.FetchError, match=r"h\.npy: not a readable \.npy array"):
        fetch.load_stamp_array(tmp_path / "h.npy")
    np.savez(tmp_path / "t.npz", stamps=np.ones((10, 441), np.float32))
    blob = (tmp_path / "t.npz").read_bytes()
    (tmp_path / "t.npz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(fetch.FetchError, match=r"t\.npz: not a readable \.npz archive"):
        fetch.load_stamp_array(tmp_path / "t.npz")


def test_not_a_numpy_file_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "stamps.npy").write_text("x,y\n1,2\n")
    with pytest.raises(fetch.FetchError, match=r"stamps\.npy: not a numpy file"):
        fetch.load_stamp_array(tmp_path / "stamps.npy")
    with zipfile.ZipFile(tmp_path / "other.npz", "w") as zf:
        zf.writestr("readme.txt", "no arrays here")
    with pytest.raises(fetch.FetchError, match=r"other\.npz: holds no arrays"):
        fetch.load_stamp_array(tmp_path / "other.npz")
    with pytest.raises(fetch.FetchError, match=r"nope\.npy: no such file"):
        fetch.load_stamp_array(tmp_path / "nope.npy")
    with pytest.raises(fetch.FetchError, match=r"is a directory"):
        fetch.load_stamp_array(tmp_path)


# --------------------------------------------------------------------------- ingest


def test_ingest_labelled_round_trip(tmp_path: Path, arrays: dict) -> None:
    out = tmp_path / "train.h5"
    info = fetch.ingest(out, sources=arrays["sources"], noise=arrays["noise"], chunk_rows=8)
    assert (info.n_stamps, info.stamp_shape, info.labelled, info.chunk_rows) == (50, (21, 21),
                                                                                   True, 8)
    assert info.meta_columns == ("kind", "source_row")
    stamps = store.read_stamps(out)
    np.testing.assert_array_equal(stamps[:30], arrays["src"])
    np.testing.assert_array_equal(stamps[30:], arrays["nse"])
    np.testing.assert_array_equal(store.read_labels(out), [1] * 30 + [0] * 20)
    meta = store.read_meta(out)
    assert list(meta["kind"]) == ["source"] * 30 + ["noise"] * 20
    np.testing.assert_array_equal(meta["source_row"], np.r_[np.arange(30), np.arange(20)])
    attrs = store.read_attrs(out)
    assert attrs["ingested_source"] == str(arrays["sources"].resolve())
    assert attrs["ingested_noise"] == str(arrays["noise"].resolve())
    assert _files(tmp_path) == ["stamps_noise.npy", "stamps_sources.npy", "train.h5",
                                "train.h5.scores"]   # its (empty) scores folder, made with it


def test_ingest_candidates_from_npz_with_key(tmp_path: Path) -> None:
    cand = gaussian_stamps(40, seed=9)
    np.savez_compressed(tmp_path / "c.npz", stamps=cand.reshape(40, 441), ids=np.arange(40.0)[:, None])
    with pytest.raises(fetch.FetchError, match=r"holds 2 arrays \(stamps, ids\)"):
        fetch.ingest(tmp_path / "c.h5", candidates=tmp_path / "c.npz")
    info = fetch.ingest(tmp_path / "c.h5", candidates=tmp_path / "c.npz", key="stamps",
                        chunk_rows=16, compression="gzip")
    assert not info.labelled and info.n_stamps == 40 and info.compression == "gzip"
    np.testing.assert_array_equal(store.read_stamps(tmp_path / "c.h5"), cand)
    np.testing.assert_array_equal(store.read_meta(tmp_path / "c.h5")["source_row"], np.arange(40))


def test_ingest_blocks_cross_chunks_and_files(tmp_path: Path, monkeypatch) -> None:
    """Many small read blocks (not multiples of the file lengths) keep rows in order."""
    monkeypatch.setattr(fetch, "_BLOCK_BYTES", 1)  # one HDF5 chunk per block
    a = gaussian_stamps(23, seed=5, shape=(9, 9))
    b = gaussian_stamps(17, seed=6, shape=(9, 9))
    np.save(tmp_path / "a.npy", a)
    np.savez(tmp_path / "b.npz", b.reshape(17, 81))
    fetch.ingest(tmp_path / "o.h5", sources=tmp_path / "a.npy", noise=tmp_path / "b.npz",
                 chunk_rows=5)
    np.testing.assert_array_equal(store.read_stamps(tmp_path / "o.h5"), np.concatenate([a, b]))
    np.testing.assert_array_equal(store.read_meta(tmp_path / "o.h5")["source_row"],
                                  np.r_[np.arange(23), np.arange(17)])


@pytest.mark.parametrize("kind", ["npy", "npz"])
def test_ingest_memory_is_bounded_by_the_block(tmp_path: Path, monkeypatch, kind: str) -> None:
    """A 36 MB input is streamed (.npy memory-mapped, .npz member read in blocks)."""
    monkeypatch.setattr(fetch, "_BLOCK_BYTES", 1 << 20)
    big = np.random.default_rng(0).normal(size=(20_000, 441)).astype(np.float32)
    path = tmp_path / f"big.{kind}"
    np.save(path, big) if kind == "npy" else np.savez(path, big)
    del big
    tracemalloc.start()
    try:
        fetch.ingest(tmp_path / "big.h5", candidates=path, chunk_rows=512)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak traced memory {peak / 2**20:.1f} MiB for a 34 MiB array"
    got = store.read_stamps(tmp_path / "big.h5", 19_990, 20_000)
    want = np.random.default_rng(0).normal(size=(20_000, 441)).astype(np.float32)[19_990:]
    np.testing.assert_array_equal(got, want.reshape(10, 21, 21))


def test_ingest_mismatched_stamp_shapes(tmp_path: Path, arrays: dict) -> None:
    np.save(tmp_path / "small.npy", np.zeros((5, 19, 19), np.float32))
    with pytest.raises(fetch.FetchError,
                       match=r"small\.npy: stamps are 19x19 but .*stamps_sources\.npy holds "
                             r"21x21 stamps"):
        fetch.ingest(tmp_path / "o.h5", sources=arrays["sources"], noise=tmp_path / "small.npy")
    assert not (tmp_path / "o.h5").exists()


def test_ingest_refuses_bad_noise_before_writing(tmp_path: Path, arrays: dict) -> None:
    obj = np.array([object()] * 3, dtype=object)
    np.save(tmp_path / "evil.npy", obj, allow_pickle=True)
    before = _files(tmp_path)
    with pytest.raises(fetch.FetchError, match=r"evil\.npy: holds Python objects"):
        fetch.ingest(tmp_path / "o.h5", sources=arrays["sources"], noise=tmp_path / "evil.npy")
    assert _files(tmp_path) == before  # neither the store nor a temporary file


def test_ingest_corrupt_npz_data_leaves_nothing(tmp_path: Path, arrays: dict) -> None:
    """A CRC error is only found while streaming: the atomic write still leaves nothing."""
    np.savez(tmp_path / "n.npz", stamps=arrays["nse"])
    blob = bytearray((tmp_path / "n.npz").read_bytes())
    blob[400] ^= 0xFF  # inside the stored (uncompressed) array data
    (tmp_path / "n.npz").write_bytes(bytes(blob))
    before = _files(tmp_path)
    with pytest.raises(fetch.FetchError, match=r"n\.npz\[stamps\]: corrupt \.npz member"):
        fetch.ingest(tmp_path / "o.h5", sources=arrays["sources"], noise=tmp_path / "n.npz")
    assert _files(tmp_path) == before


def test_ingest_existing_output_is_kept(tmp_path: Path, arrays: dict) -> None:
    out = tmp_path / "o.h5"
    out.write_bytes(b"precious")
    with pytest.raises(StampbatchError, match=r"o\.h5: already exists \(pass --overwrite"):
        fetch.ingest(out, sources=arrays["sources"], noise=arrays["noise"])
    assert out.read_bytes() == b"precious"
    fetch.ingest(out, sources=arrays["sources"], noise=arrays["noise"], overwrite=True)
    assert store.open_store(out).n_stamps == 50


def test_ingest_refuses_to_overwrite_its_input(tmp_path: Path, arrays: dict) -> None:
    with pytest.raises(fetch.FetchError, match=r"is also the input"):
        fetch.ingest(arrays["noise"], sources=arrays["sources"], noise=arrays["noise"],
                     overwrite=True)
    np.testing.assert_array_equal(np.load(arrays["noise"]), arrays["nse"])


def test_ingest_destination_directory_missing(tmp_path: Path, arrays: dict) -> None:
    with pytest.raises(StampbatchError, match=r"directory .*no_such_dir does not exist"):
        fetch.ingest(tmp_path / "no_such_dir" / "o.h5", sources=arrays["sources"],
                     noise=arrays["noise"])
    assert not (tmp_path / "no_such_dir").exists()


def test_ingest_read_only_directory_for_real(arrays: dict, readonly_dir) -> None:
    """A read-only mount (root) or a mode-0555 directory (other users): refused before any write."""
    ro = readonly_dir()
    with pytest.raises(StampbatchError, match=r"directory .*readonly is not writable"):
        fetch.ingest(ro / "o.h5", sources=arrays["sources"], noise=arrays["noise"])
    assert list(ro.iterdir()) == []


def test_ingest_argument_combinations(tmp_path: Path, arrays: dict) -> None:
    with pytest.raises(UsageError, match="give sources and noise"):
        fetch.ingest(tmp_path / "o.h5", sources=arrays["sources"])
    with pytest.raises(UsageError, match="cannot be combined"):
        fetch.ingest(tmp_path / "o.h5", sources=arrays["sources"], noise=arrays["noise"],
                     candidates=arrays["noise"])
    with pytest.raises(UsageError, match="chunk_rows must be a positive integer"):
        fetch.ingest(tmp_path / "o.h5", candidates=arrays["noise"], chunk_rows=0)
    assert not (tmp_path / "o.h5").exists()


# --------------------------------------------------------------------------- ingest CLI


def test_cli_ingest_and_inspect(tmp_path: Path, arrays: dict, capsys) -> None:
    out = tmp_path / "train.h5"
    rc = main(["ingest", str(out), "--sources", str(arrays["sources"]), "--noise",
               str(arrays["noise"]), "--chunk-rows", "16", "--compression", "lzf"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert f"wrote 50 stamps to {out}" in captured.out
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "50 stamps of 21x21, chunks of 16, compression lzf" in text
    assert "labels: 30 source / 20 no source (60.0% sources)" in text
    assert "meta: kind, source_row" in text
    assert "kinds: noise 20, source 30" in text


def test_cli_ingest_errors(tmp_path: Path, arrays: dict, capsys) -> None:
    np.save(tmp_path / "wrong.npy", np.zeros((4, 440), np.float32))
    out = tmp_path / "o.h5"
    rc = main(["ingest", str(out), "--sources", str(arrays["sources"]),
               "--noise", str(tmp_path / "wrong.npy")])
    line = _one_error_line(capsys.readouterr().err, "ingest")
    assert rc == 1 and "wrong.npy: rows of 440 values are not square stamps" in line
    assert main(["ingest", str(out), "--sources", str(arrays["sources"])]) == 2
    assert "give --sources and --noise" in _one_error_line(capsys.readouterr().err, "ingest")
    assert not out.exists()
    out.write_bytes(b"keep")
    rc = main(["ingest", str(out), "--candidates", str(arrays["noise"])])
    assert rc == 1 and "already exists" in _one_error_line(capsys.readouterr().err, "ingest")
    assert out.read_bytes() == b"keep"


# --------------------------------------------------------------------------- HTTP server


PAYLOAD = np.random.default_rng(42).bytes(300_000)
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


@dataclass
class ServerState:
    """How the test server behaves, and what it saw."""

    body: bytes = PAYLOAD
    mode: str = "range"  # range | ignore-range | drop-first | stall-first | 404 | 500-twice
    requests: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def ranges(self) -> list[str | None]:
        return [r["range"] for r in self.requests]

    @property
    def sent(self) -> list[int]:
        return [r["sent"] for r in self.requests]


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args) -> None:  # keep test output clean
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str], record: dict,
              cut: int | None = None, stall: float = 0.0) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        chunk = body if cut is None else body[:cut]
        self.wfile.write(chunk)
        self.wfile.flush()
        record["status"], record["sent"] = status, len(chunk)
        if stall:
            time.sleep(stall)
        if cut is not None or stall:
            self.close_connection = True  # the rest never comes: the client sees a short body

    def do_GET(self) -> None:
        st: ServerState = self.server.state  # type: ignore[attr-defined]
        record = {"range": self.headers.get("Range"), "status": None, "sent": 0,
                  "encoding": self.headers.get("Accept-Encoding")}
        with st.lock:
            index = len(st.requests)
            st.requests.append(record)
        body = st.body
        if st.mode == "404":
            return self._send(404, b"no such file", {}, record)
        if st.mode == "500-twice" and index < 2:
            return self._send(500, b"oops", {}, record)
        if st.mode == "drop-first" and index == 0:
            return self._send(200, body, {}, record, cut=len(body) // 2)
        if st.mode == "stall-first" and index == 0:
            return self._send(200, body, {}, record, cut=100_000, stall=1.5)
        rng = record["range"]
        if rng and st.mode != "ignore-range":
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            if start >= len(body):
                return self._send(416, b"", {"Content-Range": f"bytes */{len(body)}"}, record)
            return self._send(206, body[start:], {
                "Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"}, record)
        return self._send(200, body, {}, record)


class QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # a client that hung up
        pass


@pytest.fixture
def server():
    """Start a real HTTP server on 127.0.0.1; yield (base URL, state)."""
    srv = QuietServer(("127.0.0.1", 0), Handler)
    srv.state = ServerState()  # type: ignore[attr-defined]
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/payload.bin", srv.state
    finally:
        srv.shutdown()
        srv.server_close()


def _fast(**kw):
    return {"backoff": 0.01, "progress": False, "timeout": 5.0, **kw}


# --------------------------------------------------------------------------- download


def test_download_plain(tmp_path: Path, server) -> None:
    url, st = server
    dest = tmp_path / "payload.bin"
    assert fetch.download(url, dest, PAYLOAD_SHA, **_fast()) == dest
    assert dest.read_bytes() == PAYLOAD
    assert st.ranges == [None] and st.requests[0]["encoding"] == "identity"
    assert _files(tmp_path) == ["payload.bin"]


def test_download_resumes_after_dropped_connection(tmp_path: Path, server) -> None:
    url, st = server
    st.mode = "drop-first"
    dest = tmp_path / "payload.bin"
    fetch.download(url, dest, PAYLOAD_SHA.upper(), **_fast())
    half = len(PAYLOAD) // 2
    assert dest.read_bytes() == PAYLOAD
    assert st.ranges == [None, f"bytes={half}-"]
    assert st.sent == [half, len(PAYLOAD) - half]  # only the missing bytes travelled again
    assert [r["status"] for r in st.requests] == [200, 206]
    assert _files(tmp_path) == ["payload.bin"]


def test_download_resumes_after_read_timeout(tmp_path: Path, server) -> None:
    url, st = server
    st.mode = "stall-first"
    dest = tmp_path / "payload.bin"
    t0 = time.monotonic()
    fetch.download(url, dest, PAYLOAD_SHA, **_fast(timeout=0.3))
    assert time.monotonic() - t0 < 1.4  # gave up on the stalled connection, did not wait it out
    assert dest.read_bytes() == PAYLOAD
    assert st.ranges == [None, "bytes=100000-"]
    assert st.sent == [100_000, len(PAYLOAD) - 100_000]


def test_download_resumes_partial_left_by_an_earlier_run(tmp_path: Path, server) -> None:
    url, st = server
    dest = tmp_path / "payload.bin"
    (tmp_path / "payload.bin.part").write_bytes(PAYLOAD[:123_456])
    fetch.download(url, dest, PAYLOAD_SHA, **_fast())
    assert dest.read_bytes() == PAYLOAD
    assert st.ranges == ["bytes=123456-"] and st.sent == [len(PAYLOAD) - 123_456]
    assert _files(tmp_path) == ["payload.bin"]


def test_download_stale_partial_of_another_file_restarts_once(tmp_path: Path, server) -> None:
    url, st = server
    dest = tmp_path / "payload.bin"
    (tmp_path / "payload.bin.part").write_bytes(b"\0" * 1000)
    fetch.download(url, dest, PAYLOAD_SHA, **_fast())
    assert dest.read_bytes() == PAYLOAD
    assert st.ranges == ["bytes=1000-", None]


def test_download_server_ignoring_range_restarts_from_zero(tmp_path: Path, server) -> None:
    url, st = server
    st.mode = "ignore-range"
    dest = tmp_path / "payload.bin"
    (tmp_path / "payload.bin.part").write_bytes(PAYLOAD[:50_000])
    fetch.download(url, dest, PAYLOAD_SHA, **_fast())
    assert dest.read_bytes() == PAYLOAD  # not the first 50 kB twice
    assert st.ranges == ["bytes=50000-"] and st.sent == [len(PAYLOAD)]


def test_download_416_complete_partial_and_oversized_partial(tmp_path: Path, server) -> None:
    url, st = server
    dest = tmp_path / "payload.bin"
    (tmp_path / "payload.bin.part").write_bytes(PAYLOAD)  # finished, but never renamed
    fetch.download(url, dest, PAYLOAD_SHA, **_fast())
    assert dest.read_bytes() == PAYLOAD
    assert st.ranges == [f"bytes={len(PAYLOAD)}-"] and st.sent == [0]
    st.requests.clear()
    dest2 = tmp_path / "again.bin"
    (tmp_path / "again.bin.part").write_bytes(PAYLOAD + b"junk")
    fetch.download(url, dest2, PAYLOAD_SHA, **_fast())
    assert dest2.read_bytes() == PAYLOAD
    assert st.ranges == [f"bytes={len(PAYLOAD) + 4}-", None]


def test_download_404_fails_at_once(tmp_path: Path, server) -> None:
    url, st = server
    st.mode = "404"
    with pytest.raises(fetch.FetchError) as err:
        fetch.download(url, tmp_path / "x.bin", PAYLOAD_SHA, **_fast())
    assert str(err.value) == f"{url}: HTTP 404 Not Found"
    assert len(st.requests) == 1
    assert _files(tmp_path) == []


def test_download_500_twice_then_success(tmp_path: Path, server) -> None:
    url, st = server
    st.mode = "500-twice"
    fetch.download(url, tmp_path / "x.bin", PAYLOAD_SHA, **_fast(retries=2))
    assert (tmp_path / "x.bin").read_bytes() == PAYLOAD
    assert [r["status"] for r in st.requests] == [500, 500, 200]


def test_download_gives_up_after_retries(tmp_path: Path, server) -> None:
    url, st = server
    st.mode = "500-twice"
    t0 = time.monotonic()
    with pytest.raises(fetch.FetchError,
                       match=r"gave up after 2 attempts without progress \(HTTP 500"):
        fetch.download(url, tmp_path / "x.bin", PAYLOAD_SHA, **_fast(retries=1, backoff=0.2))
    assert time.monotonic() - t0 >= 0.2  # backed off before the retry
    assert len(st.requests) == 2 and _files(tmp_path) == []


def test_download_connection_refused(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again at once: nothing listens there
    with pytest.raises(fetch.FetchError,
                       match=r"gave up after 3 attempts without progress \(.*refused"):
        fetch.download(f"http://127.0.0.1:{port}/f", tmp_path / "f", PAYLOAD_SHA,
                       **_fast(retries=2))
    assert _files(tmp_path) == []


def test_download_checksum_mismatch_leaves_nothing(tmp_path: Path, server) -> None:
    url, st = server
    st.body = PAYLOAD[:-1] + b"X"
    wrong = hashlib.sha256(st.body).hexdigest()
    with pytest.raises(fetch.FetchError) as err:
        fetch.download(url, tmp_path / "x.bin", PAYLOAD_SHA, **_fast())
    assert str(err.value) == (f"{url}: sha256 mismatch: expected {PAYLOAD_SHA}, got {wrong}; "
                              f"the download was discarded")
    assert _files(tmp_path) == []


def test_download_existing_destination(tmp_path: Path, server) -> None:
    url, st = server
    dest = tmp_path / "x.bin"
    dest.write_bytes(PAYLOAD)
    assert fetch.download(url, dest, PAYLOAD_SHA, **_fast()) == dest
    assert st.requests == []  # already there and verified: nothing downloaded
    dest.write_bytes(b"something else")
    with pytest.raises(fetch.FetchError, match=r"x\.bin: already exists with sha256 [0-9a-f]{64}, "
                                               r"not " + PAYLOAD_SHA):
        fetch.download(url, dest, PAYLOAD_SHA, **_fast())
    assert dest.read_bytes() == b"something else" and st.requests == []
    fetch.download(url, dest, PAYLOAD_SHA, **_fast(overwrite=True))
    assert dest.read_bytes() == PAYLOAD and len(st.requests) == 1


def test_download_checks_arguments_before_the_network(tmp_path: Path, server) -> None:
    url, st = server
    with pytest.raises(UsageError, match=r"--sha256 must be 64 hexadecimal digits"):
        fetch.download(url, tmp_path / "x", "abc123", **_fast())
    with pytest.raises(UsageError, match=r"--sha256 must be 64"):
        fetch.download(url, tmp_path / "x", "g" * 64, **_fast())
    with pytest.raises(UsageError, match=r"not an http\(s\) URL"):
        fetch.download("ftp://example.org/x", tmp_path / "x", PAYLOAD_SHA, **_fast())
    with pytest.raises(fetch.FetchError, match=r"directory .*missing does not exist"):
        fetch.download(url, tmp_path / "missing" / "x", PAYLOAD_SHA, **_fast())
    with pytest.raises(fetch.FetchError, match=r"is a directory"):
        fetch.download(url, tmp_path, PAYLOAD_SHA, **_fast())
    assert st.requests == [] and _files(tmp_path) == []


def test_download_refuses_a_second_concurrent_download(tmp_path: Path, server) -> None:
    url, st = server
    part = tmp_path / "x.bin.part"
    part.write_bytes(PAYLOAD[:10])
    with open(part, "r+b") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        with pytest.raises(fetch.FetchError, match=r"another download into this file is running"):
            fetch.download(url, tmp_path / "x.bin", PAYLOAD_SHA, **_fast())
    assert part.read_bytes() == PAYLOAD[:10] and st.requests == []


def test_download_progress_line(tmp_path: Path, server, capsys) -> None:
    url, _ = server
    fetch.download(url, tmp_path / "payload.bin", PAYLOAD_SHA, backoff=0.01, progress=True)
    err = capsys.readouterr().err
    assert "fetch payload.bin: 0.3/0.3 MiB (100.0%)" in err


# --------------------------------------------------------------------------- fetch CLI


def test_cli_fetch(tmp_path: Path, server, capsys) -> None:
    url, st = server
    dest = tmp_path / "payload.bin"
    assert main(["fetch", url, str(dest), "--sha256", PAYLOAD_SHA, "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == f"downloaded {url} to {dest} (sha256 verified)"
    assert captured.err == ""
    assert dest.read_bytes() == PAYLOAD


def test_cli_fetch_errors(tmp_path: Path, server, capsys) -> None:
    url, st = server
    dest = tmp_path / "payload.bin"
    assert main(["fetch", url, str(dest), "--sha256", "1234", "--quiet"]) == 2
    assert "--sha256 must be 64 hexadecimal digits" in _one_error_line(
        capsys.readouterr().err, "fetch")
    st.body = b"tampered"
    assert main(["fetch", url, str(dest), "--sha256", PAYLOAD_SHA, "--quiet"]) == 1
    assert "sha256 mismatch" in _one_error_line(capsys.readouterr().err, "fetch")
    st.mode = "404"
    assert main(["fetch", url, str(dest), "--sha256", PAYLOAD_SHA, "--quiet"]) == 1
    assert _one_error_line(capsys.readouterr().err, "fetch").endswith("HTTP 404 Not Found")
    assert _files(tmp_path) == []


def test_cli_fetch_then_ingest(tmp_path: Path, server, capsys) -> None:
    """The documented path: download a published .npy, verify it, ingest it."""
    url, st = server
    cand = gaussian_stamps(12, seed=7)
    np.save(tmp_path / "src.npy", cand.reshape(12, 441))
    st.body = (tmp_path / "src.npy").read_bytes()
    sha = hashlib.sha256(st.body).hexdigest()
    dl = tmp_path / "dl.npy"
    assert main(["fetch", url, str(dl), "--sha256", sha, "--quiet"]) == 0
    assert main(["ingest", str(tmp_path / "c.h5"), "--candidates", str(dl)]) == 0
    capsys.readouterr()
    assert store.read_attrs(tmp_path / "c.h5")["ingested_candidates"] == str(dl.resolve())
    np.testing.assert_array_equal(store.read_stamps(tmp_path / "c.h5"), cand)
