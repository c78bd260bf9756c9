"""GET/POST /files against a real envd in host mode."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import Envd, wait_for


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if ".upload-" in p.name)


def test_upload_then_download_round_trip(envd: Envd, client: httpx.Client) -> None:
    payload = os.urandom(300_000)
    r = client.post(
        "/files", params={"path": "/data/blob.bin"}, files={"file": ("ignored.bin", payload)}
    )
    assert r.status_code == 200
    assert r.json() == [{"path": "/data/blob.bin", "name": "blob.bin", "type": "file"}]
    assert (envd.root / "data" / "blob.bin").read_bytes() == payload
    got = client.get("/files", params={"path": "/data/blob.bin"})
    assert got.status_code == 200
    assert got.content == payload
    assert got.headers["content-length"] == str(len(payload))
    assert leftovers(envd.root / "data") == []


def test_upload_replaces_an_existing_file_and_keeps_its_mode(
    envd: Envd, client: httpx.Client
) -> None:
    target = envd.root / "data" / "script.sh"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("old")
    target.chmod(0o751)
    r = client.post("/files", params={"path": "/data/script.sh"}, files={"file": ("x", b"new")})
    assert r.status_code == 200
    assert target.read_text() == "new"
    assert target.stat().st_mode & 0o777 == 0o751


def test_several_files_into_a_directory_creating_parents(envd: Envd, client: httpx.Client) -> None:
    r = client.post(
        "/files",
        params={"path": "/deep/new/dir/"},
        files=[("file", ("a.txt", b"A")), ("file", ("b.txt", b"B")), ("other", ("c.txt", b"C"))],
    )
    assert r.status_code == 200
    assert [item["path"] for item in r.json()] == ["/deep/new/dir/a.txt", "/deep/new/dir/b.txt"]
    assert (envd.root / "deep/new/dir/a.txt").read_text() == "A"
    assert not (envd.root / "deep/new/dir/c.txt").exists()


def test_without_path_the_filename_lands_in_home(envd: Envd, client: httpx.Client) -> None:
    r = client.post("/files", files={"file": ("notes.txt", b"hi")})
    assert r.status_code == 200
    assert (envd.home / "notes.txt").read_bytes() == b"hi"
    # and a relative path means relative to home, for download too
    assert client.get("/files", params={"path": "notes.txt"}).content == b"hi"
    assert r.json()[0]["path"] == "/" + str((envd.home / "notes.txt").relative_to(envd.root))


def test_existing_directory_as_path_takes_the_filename(envd: Envd, client: httpx.Client) -> None:
    (envd.root / "inbox").mkdir(exist_ok=True)
    r = client.post("/files", params={"path": "/inbox"}, files={"file": ("m.txt", b"m")})
    assert r.status_code == 200
    assert (envd.root / "inbox" / "m.txt").read_bytes() == b"m"


def test_raw_body_upload(envd: Envd, client: httpx.Client) -> None:
    r = client.post(
        "/files",
        params={"path": "/raw/r.bin"},
        content=b"\x00\x01",
        headers={"content-type": "application/octet-stream"},
    )
    assert r.status_code == 200
    assert (envd.root / "raw" / "r.bin").read_bytes() == b"\x00\x01"


@pytest.mark.parametrize(
    ("params", "status", "code"),
    [
        ({}, 400, "invalid_path"),
        ({"path": "/does/not/exist"}, 404, "file_not_found"),
        ({"path": "/"}, 400, "is_a_directory"),
        ({"path": "../../../../etc/passwd"}, 403, "path_escape"),
        ({"path": "/data/blob.bin/below-a-file"}, 404, "file_not_found"),
    ],
)
def test_download_errors(
    client: httpx.Client, params: dict[str, str], status: int, code: str
) -> None:
    r = client.get("/files", params=params)
    assert r.status_code == status
    assert r.json()["error"] == code
    assert r.json()["message"]


def test_download_of_a_fifo_is_refused_without_hanging(envd: Envd, client: httpx.Client) -> None:
    os.mkfifo(envd.root / "pipe")
    r = client.get("/files", params={"path": "/pipe"})
    assert r.status_code == 400
    assert r.json()["error"] == "not_a_regular_file"


def test_symlink_out_of_the_root_is_refused(envd: Envd, client: httpx.Client) -> None:
    (envd.root / "escape").symlink_to("/etc")
    r = client.get("/files", params={"path": "/escape/hostname"})
    assert r.status_code == 403
    assert r.json()["error"] == "path_escape"
    r = client.post("/files", params={"path": "/escape/pwned"}, files={"file": ("x", b"x")})
    assert r.status_code == 403
    assert not Path("/etc/pwned").exists()


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        (
            {"content": b"just bytes", "headers": {"content-type": "text/plain"}},
            415,
            "unsupported_media_type",
        ),
        ({"data": {"name": "value"}, "files": {"other": ("x", b"x")}}, 400, "no_files"),
        (
            {
                "content": b'--b\r\nContent-Disposition: form-data; name="file"; filename="t"\r\n'
                b"\r\nhalf a body",
                "headers": {"content-type": "multipart/form-data; boundary=b"},
            },
            400,
            "incomplete_upload",
        ),
        (
            {"content": b"garbage", "headers": {"content-type": "multipart/form-data"}},
            400,
            "invalid_multipart",
        ),
        (
            {
                "content": b"garbage\r\n\r\n",
                "headers": {"content-type": "multipart/form-data; boundary=b"},
            },
            400,
            "invalid_multipart",
        ),
        (
            {
                "files": [("file", ("a", b"1")), ("file", ("b", b"2"))],
                "params": {"path": "/single-target.txt"},
            },
            400,
            "invalid_path",
        ),
        (
            {"files": {"file": ("x", b"1")}, "params": {"path": "/data/blob.bin/child"}},
            400,
            "not_a_directory",
        ),
        ({"files": {"file": ("", b"1")}}, 400, "no_files"),  # what a browser sends for none
        ({"files": {"file": ("/", b"1")}}, 400, "invalid_path"),
    ],
)
def test_bad_uploads_leave_nothing(
    envd: Envd, client: httpx.Client, kwargs: dict[str, object], status: int, code: str
) -> None:
    before = sorted(str(p) for p in envd.root.rglob("*"))
    r = client.post("/files", **kwargs)  # type: ignore[arg-type]
    assert r.status_code == status, r.text
    assert r.json()["error"] == code
    assert sorted(str(p) for p in envd.root.rglob("*")) == before


def test_an_upload_cut_off_halfway_leaves_nothing(envd: Envd, client: httpx.Client) -> None:
    boundary = "cutcutcut"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n\r\n'
    ).encode()
    declared = 10 * 1024 * 1024
    request = (
        (
            f"POST /files?path=/cut/sub/big.bin HTTP/1.1\r\nHost: x\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {declared}\r\n\r\n"
        ).encode()
        + head
        + b"x" * 2_000_000
    )
    with socket.create_connection(("127.0.0.1", envd.port)) as sock:
        sock.sendall(request)
        # The upload is under way: its temporary file exists next to the target.
        wait_for(
            lambda: (envd.root / "cut" / "sub").is_dir() and leftovers(envd.root / "cut" / "sub")
        )
    # The server notices the disconnect; the temp file and the directories it made go away.
    wait_for(lambda: not (envd.root / "cut").exists())
    assert client.get("/health").status_code == 200


@pytest.fixture
def tiny_disk(envd: Envd) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = envd.root / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
        mount.rmdir()


def test_disk_full_is_507_and_leaves_nothing(tiny_disk: Path, client: httpx.Client) -> None:
    r = client.post(
        "/files",
        params={"path": "/tiny/sub/big.bin"},
        files=[("file", ("big.bin", b"z" * 500_000))],
    )
    assert r.status_code == 507
    assert r.json()["error"] == "insufficient_storage"
    assert list(tiny_disk.iterdir()) == []
    small = client.post("/files", params={"path": "/tiny/ok.txt"}, files={"file": ("x", b"ok")})
    assert small.status_code == 200


def test_unreadable_file_is_403(envd_factory: Callable[..., Envd]) -> None:
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:
        # root reads anything; an envd without the DAC override capabilities cannot.
        prefix = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search")
    envd = envd_factory(prefix=prefix)
    secret = envd.root / "secret.txt"
    secret.write_text("top secret")
    secret.chmod(0)
    with envd.client() as c:
        r = c.get("/files", params={"path": "/secret.txt"})
        assert r.status_code == 403
        assert r.json()["error"] == "permission_denied"
        assert c.get("/health").status_code == 200
