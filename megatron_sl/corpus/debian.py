"""Fetch a Debian binary package with apt and read files out of it, without installing it.

Owns :func:`apt_download` (``apt-get download``, running ``apt-get update`` once when the package
lists are missing and we are root) and :func:`read_deb_files` (the ``.deb`` payload read with
python-debian's ``DebFile``, which handles every payload compression dpkg writes).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from debian.debfile import DebError, DebFile

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


def read_deb_files(deb: Path, suffixes: tuple[str, ...]) -> dict[str, bytes]:
    """Contents of the regular files in ``deb`` whose path ends with one of ``suffixes``."""
    out = {}
    try:
        package = DebFile(str(deb))
        try:
            tar = package.data.tgz()
            for member in tar.getmembers():
                if member.isfile() and member.name.endswith(suffixes):
                    out[member.name.lstrip("./")] = tar.extractfile(member).read()
        finally:
            package.close()
    except (DebError, OSError, EOFError) as err:
        raise ValueError(f"{deb} is not a readable .deb: {err}") from err
    return out
