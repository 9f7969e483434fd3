"""The `.qcc` artifact: one zip (stored, fixed timestamps) holding

    manifest.json          entry signature, formats, target, versions, sha256 of each member
    weights.safetensors    the parameter store, packed as the kernels read it
    code/<target>.so       native code (CPU); PTX/cubin for CUDA

Loading never unpickles: JSON, safetensors and a shared library whose hash is
checked before it is opened.  Equal inputs give byte-identical archives.
"""

import hashlib
import io
import json
import os
import tempfile
import zipfile

import numpy as np

from qcc.errors import QccError

FORMAT_VERSION = 1
_EPOCH = (2020, 1, 1, 0, 0, 0)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write(path: str, manifest: dict, weights: bytes, code: dict[str, bytes]) -> None:
    manifest = dict(manifest, format_version=FORMAT_VERSION)
    manifest["files"] = {"weights.safetensors": _sha256(weights),
                         **{f"code/{n}": _sha256(b) for n, b in sorted(code.items())}}
    members = [("manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode()),
               ("weights.safetensors", weights)] + [(f"code/{n}", b) for n, b in sorted(code.items())]
    tmp = f"{path}.tmp-{os.getpid()}"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=_EPOCH)
            info.external_attr = 0o644 << 16
            z.writestr(info, data)
    os.replace(tmp, path)  # never leave a half-written artifact behind


def read(path: str):
    """Returns (manifest, weights as {name: array}, {code name: bytes}); validates hashes."""
    if not os.path.isfile(path):
        raise QccError("no such artifact", where=path, hint="create one with `qcc compile`")
    try:
        z = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise QccError("not a qcc artifact (not a zip archive)", where=path)
    try:
        return _read_members(z, path)
    except zipfile.BadZipFile as e:
        raise QccError(f"corrupted artifact: {e}", where=path, hint="recompile it with `qcc compile`")
    finally:
        z.close()


def _read_members(z: zipfile.ZipFile, path: str):
    names = set(z.namelist())
    if "manifest.json" not in names:
        raise QccError("not a qcc artifact (no manifest.json)", where=path)
    try:
        manifest = json.loads(z.read("manifest.json"))
    except ValueError as e:
        raise QccError(f"corrupted manifest.json: {e}", where=path)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise QccError(f"artifact format {manifest.get('format_version')} is not {FORMAT_VERSION}",
                       where=path, hint="recompile it with this qcc")
    blobs = {}
    for name, digest in manifest.get("files", {}).items():
        if name not in names:
            raise QccError(f"artifact lacks {name}", where=path)
        data = z.read(name)
        if _sha256(data) != digest:
            raise QccError(f"hash mismatch for {name}: the artifact is corrupted", where=path)
        blobs[name] = data
    from safetensors.numpy import load

    weights = load(blobs.pop("weights.safetensors"))
    code = {n[len("code/"):]: b for n, b in blobs.items()}
    return manifest, weights, code


def materialize(code: bytes, suffix: str) -> str:
    """Writes a code blob to a private temp file (a shared library must be a file to dlopen)."""
    fd, path = tempfile.mkstemp(prefix="qcc-", suffix=suffix)
    with os.fdopen(fd, "wb") as f:
        f.write(code)
    return path
