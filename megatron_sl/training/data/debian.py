"""Fetch a Debian binary package with apt and read files out of it, without installing it.

Owns :func:`apt_download` (``apt-get download``, running ``apt-get update`` once when the package
lists are missing and we are root) and :func:`read_deb_files` (a stdlib ``ar`` + ``tarfile``
reader of the ``.deb`` payload; ``dpkg-deb --fsys-tarfile`` only for codecs tarfile lacks).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

APT_TIMEOUT_S = 300


class AptUnavailable(RuntimeError):
    """apt cannot provide the package here (no apt, no lists, no network, not found)."""


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=APT_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        raise AptUnavailable(f"`{' '.join(cmd)}` timed out after {APT_TIMEOUT_S} s") from err


def apt_download(package: str, dest_dir: Path) -> Path:
    """Download ``package``'s ``.deb`` into ``dest_dir`` (nothing is installed); return its path."""
    if shutil.which("apt-get") is None:
        raise AptUnavailable("apt-get not found (not a Debian/Ubuntu system)")
    dest_dir.mkdir(parents=True, exist_ok=True)
    result = _run(["apt-get", "download", package], dest_dir)
    if result.returncode != 0 and os.geteuid() == 0:
        # fresh machines have no package lists; refreshing them needs root
        update = _run(["apt-get", "update", "-qq"], dest_dir)
        if update.returncode == 0:
            result = _run(["apt-get", "download", package], dest_dir)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        hint = "" if os.geteuid() == 0 else " (not root, so `apt-get update` was not tried)"
        raise AptUnavailable(f"`apt-get download {package}` failed: {tail[0]}{hint}")
    debs = sorted(dest_dir.glob(f"{package}_*.deb"))
    if not debs:
        raise AptUnavailable(f"`apt-get download {package}` left no .deb in {dest_dir}")
    return debs[-1]


def _ar_members(data: bytes) -> dict[str, bytes]:
    if data[:8] != b"!<arch>\n":
        raise ValueError("not an ar archive (a .deb starts with '!<arch>')")
    members, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        members[name] = data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)  # members are 2-byte aligned
    return members


def _payload_tar(deb: Path) -> tarfile.TarFile:
    members = _ar_members(deb.read_bytes())
    payload_name = next((n for n in members if n.startswith("data.tar")), None)
    if payload_name is None:
        raise ValueError(f"{deb} has no data.tar member")
    if payload_name.endswith((".xz", ".gz", ".bz2")) or payload_name == "data.tar":
        return tarfile.open(fileobj=io.BytesIO(members[payload_name]), mode="r:*")
    if shutil.which("dpkg-deb") is None:
        raise ValueError(f"{deb}: {payload_name} needs dpkg-deb, which is not installed")
    tar_bytes = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
    return tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:")


def read_deb_files(deb: Path, suffixes: tuple[str, ...]) -> dict[str, bytes]:
    """Contents of the regular files in ``deb`` whose path ends with one of ``suffixes``."""
    out = {}
    with _payload_tar(deb) as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.endswith(suffixes):
                out[member.name.lstrip("./")] = tar.extractfile(member).read()
    return out
