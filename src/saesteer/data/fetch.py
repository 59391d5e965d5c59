"""``saesteer data fetch``: download the named sets into a data dir, checksum-verified, written atomically.

* Hub files go through ``huggingface_hub.hf_hub_download`` (it honours ``HF_ENDPOINT``) into a private cache inside
  the staging folder, which is removed afterwards; plain URLs are streamed with ``httpx``.
* Plain downloads stream into ``<dest>/.saesteer-downloads/…/<name>.part``. A dropped connection is retried (up to
  ``retries`` times) and *resumes* with an HTTP ``Range`` request from the bytes already there; a server that ignores
  the range (answers 200) restarts the file from scratch. A ``.part`` left by an interrupted run is resumed the same way.
* Every verbatim file, every input of a converted file and every converted result is checked against its sha256.
  A mismatch raises :class:`SaesteerError` (one line) and removes what was downloaded for that file: no partial file,
  no temp file. The final file appears only through ``os.replace`` of a complete, verified temp file next to it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from saesteer.core import SaesteerError, ensure

from .sources import (
    REGISTRY,
    DataFile,
    DataSet,
    Source,
    find_file,
    get_set,
    search_roots,
    set_for_path,
    user_data_dir,
)

STAGING = ".saesteer-downloads"
_PROGRESS_MIN = 1 << 20  # show a progress bar from 1 MiB


@dataclass
class FetchResult:
    set: str
    path: str
    status: str
    """``present`` (already there with the right checksum), ``fetched``, or ``skipped`` (no automatic source)."""
    source: str = ""


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _short(s: str | None) -> str:
    return (s or "?")[:12]


# --------------------------------------------------------------------------------------------- transports
def _http_download(url: str, part: Path, *, retries: int = 3, progress: bool = True, timeout: float = 60.0) -> None:
    """Stream ``url`` into ``part``, resuming with ``Range`` after a dropped connection (or from an existing part)."""
    import httpx

    last: Exception | None = None
    for _attempt in range(retries + 1):
        have = part.stat().st_size if part.exists() else 0
        headers = {"Accept-Encoding": "identity"}  # byte offsets must be those of the file itself
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with httpx.stream("GET", url, headers=headers, follow_redirects=True, timeout=timeout) as r:
                if r.status_code == 416 and have:  # nothing left to send: the part is complete (or junk)
                    return
                if r.status_code >= 400:
                    raise SaesteerError(f"download failed: {url}: HTTP {r.status_code}")
                mode = "ab" if (have and r.status_code == 206) else "wb"  # 200 to a range request: start over
                start = have if mode == "ab" else 0
                total = r.headers.get("Content-Length")
                total_n = int(total) + start if total and total.isdigit() else None
                bar = None
                if progress and (total_n or 0) >= _PROGRESS_MIN:
                    from tqdm.auto import tqdm

                    bar = tqdm(total=total_n, initial=start, unit="B", unit_scale=True, file=sys.stderr,
                               desc=part.name.removesuffix(".part"), leave=False)
                try:
                    with open(part, mode) as f:
                        for chunk in r.iter_raw():  # unbuffered: what arrived before a drop is kept
                            f.write(chunk)
                            if bar is not None:
                                bar.update(len(chunk))
                finally:
                    if bar is not None:
                        bar.close()
                if total_n is not None and part.stat().st_size < total_n:
                    raise httpx.RemoteProtocolError("connection closed before the end of the file")
                return
        except (httpx.TransportError, httpx.StreamError) as e:  # dropped / refused / timed out: resume
            last = e
    msg = str(last).splitlines()[0] if last and str(last) else type(last).__name__
    raise SaesteerError(f"download failed: {url}: {msg} (after {retries + 1} attempts)")


def _hf_download(src: Source, target: Path, staging: Path) -> None:
    """One hub file through ``hf_hub_download`` (private cache under ``staging``), moved to ``target``."""
    from huggingface_hub import hf_hub_download

    cache = staging / "hf-cache"
    try:
        path = hf_hub_download(src.repo_id, src.filename, repo_type=src.repo_type, revision=src.revision,
                               cache_dir=cache, endpoint=os.environ.get("HF_ENDPOINT") or None)
        shutil.copyfile(os.path.realpath(path), target)
    except SaesteerError:
        raise
    except Exception as e:  # noqa: BLE001  (network, 404, auth: all user-facing)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SaesteerError(f"download failed: {src.describe()}: {msg}") from None
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _extract_member(archive: Path, member: str, target: Path) -> None:
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z, z.open(member) as f, open(target, "wb") as out:
                shutil.copyfileobj(f, out)
        else:
            import tarfile

            with tarfile.open(archive) as t:
                f = t.extractfile(member)
                ensure(f is not None, f"{member} is not a file in {archive.name}")
                with open(target, "wb") as out:
                    shutil.copyfileobj(f, out)  # type: ignore[arg-type]
    except KeyError:
        raise SaesteerError(f"{member} not found in {archive.name}") from None


def download(src: Source, target: Path, *, sha256: str | None, staging: Path, progress: bool = True,
             retries: int = 3) -> None:
    """Fetch one source into ``target`` (a staging path) and check ``sha256``; on a mismatch remove it and raise."""
    staging.mkdir(parents=True, exist_ok=True)
    if src.kind == "hf":
        _hf_download(src, target, staging)
    elif src.member:
        archive = staging / (hashlib.sha256(src.url.encode()).hexdigest()[:16] + ".archive.part")
        _http_download(src.url, archive, retries=retries, progress=progress)
        try:
            _extract_member(archive, src.member, target)
        finally:
            archive.unlink(missing_ok=True)
    else:
        part = target.with_name(target.name + ".part")
        _http_download(src.url, part, retries=retries, progress=progress)
        os.replace(part, target)
    if sha256 is not None:
        got = sha256_file(target)
        if got != sha256:
            target.unlink(missing_ok=True)
            raise SaesteerError(f"checksum mismatch for {target.name} from {src.describe()}: expected sha256 "
                                f"{_short(sha256)}…, got {_short(got)}…")


def _download_any(sources: tuple[Source, ...], target: Path, *, sha256: str | None, staging: Path, progress: bool,
                  what: str) -> Source:
    """Try the mirrors in order; one error line naming each failure when all fail."""
    errors = []
    for src in sources:
        try:
            download(src, target, sha256=sha256, staging=staging, progress=progress)
            return src
        except SaesteerError as e:
            errors.append(str(e))
    raise SaesteerError(f"could not fetch {what}: " + "; ".join(errors) if errors else f"{what} has no source")


# --------------------------------------------------------------------------------------------- files and sets
def _install(tmp: Path, final: Path) -> None:
    """Move a complete, verified staging file into place (same file system: the staging folder is inside dest)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(tmp, 0o644)
    os.replace(tmp, final)


def fetch_file(f: DataFile, dest: Path, *, force: bool = False, progress: bool = True) -> tuple[str, str]:
    """Make ``dest / f.path`` hold the verified bytes; returns ``(status, source)``."""
    final = dest / f.path
    if not force and final.is_file() and final.stat().st_size == f.size and sha256_file(final) == f.sha256:
        return "present", str(final)
    if not f.fetchable:
        raise SaesteerError(f"{f.path} cannot be fetched automatically: {f.note or 'no upstream recorded'}")
    staging = dest / STAGING / hashlib.sha256(f.path.encode()).hexdigest()[:16]
    if force:
        shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True, exist_ok=True)
    ok = False
    try:
        if f.sources:
            target = staging / Path(f.path).name
            src = _download_any(f.sources, target, sha256=f.sha256, staging=staging, progress=progress, what=f.path)
            how = src.describe()
        else:
            paths = []
            for i, inp in enumerate(f.inputs):
                p = staging / f"in{i}" / Path(inp.name).name
                p.parent.mkdir(parents=True, exist_ok=True)
                _download_any(inp.sources, p, sha256=inp.sha256, staging=p.parent, progress=progress,
                              what=f"{inp.name} (input of {f.path})")
                paths.append(p)
            from .convert import CONVERTERS

            data = CONVERTERS[f.convert](paths)
            got = hashlib.sha256(data).hexdigest()
            if got != f.sha256:
                raise SaesteerError(f"checksum mismatch for {f.path} converted by {f.convert}: expected sha256 "
                                    f"{_short(f.sha256)}…, got {_short(got)}…")
            target = staging / Path(f.path).name
            target.write_bytes(data)
            how = f.describe()
        _install(target, final)
        ok = True
        return "fetched", how
    finally:
        # On success nothing is left to resume; on a checksum error nothing may stay behind; on an interrupted
        # download the .part stays so that the next run resumes it.
        interrupted = not ok and any(staging.rglob("*.part"))
        if ok or not interrupted:
            shutil.rmtree(staging, ignore_errors=True)
        with contextlib.suppress(OSError):
            (dest / STAGING).rmdir()


def fetch_sets(names: list[str] | None = None, *, dest: str | os.PathLike | None = None, force: bool = False,
               progress: bool = True) -> list[FetchResult]:
    """Fetch the named sets (None: all fetchable ones) into ``dest`` (default: the user data dir)."""
    dest_p = Path(dest).expanduser() if dest else user_data_dir()
    dest_p.mkdir(parents=True, exist_ok=True)
    sets: list[DataSet] = [get_set(n) for n in names] if names else list(REGISTRY.values())
    out: list[FetchResult] = []
    seen: set[str] = set()
    for ds in sets:
        for f in ds.files:
            if f.path in seen:
                continue
            seen.add(f.path)
            if not names and not f.fetchable:  # --all: say what has no automatic source instead of failing
                out.append(FetchResult(ds.name, f.path, "skipped", f.note))
                continue
            status, how = fetch_file(f, dest_p, force=force, progress=progress)
            out.append(FetchResult(ds.name, f.path, status, how))
    return out


# --------------------------------------------------------------------------------------------- resolution
def fetch_on_demand() -> bool:
    """``SAESTEER_FETCH`` is set to 1 / true / yes."""
    return os.environ.get("SAESTEER_FETCH", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_file(set_name: str | None, rel: str, *, fetch: bool | None = None) -> Path:
    """The path of data file ``rel`` (relative to a data root), searched in resolution order.

    ``set_name`` names the set for the error message and for fetching (default: the set that owns ``rel``). When the
    file is nowhere, ``fetch`` (default: ``SAESTEER_FETCH``) fetches the set into the user data dir; otherwise a
    :class:`SaesteerError` names ``saesteer data fetch NAME``."""
    rel = Path(rel).as_posix()
    found = find_file(rel)
    if found is not None:
        return found[1]
    ds = get_set(set_name) if set_name else set_for_path(rel)
    name = ds.name if ds else None
    if fetch is None:
        fetch = fetch_on_demand()
    if fetch and ds is not None:
        fetch_sets([ds.name])
        found = find_file(rel)
        if found is not None:
            return found[1]
    where = ", ".join(f"{o}={r}" for o, r in search_roots())
    hint = (f"run `saesteer data fetch {name}` (or set SAESTEER_FETCH=1, or SAESTEER_DATA=DIR)" if name
            else "set SAESTEER_DATA=DIR")
    raise SaesteerError(f"data set {name or rel!r} not found (looked for {rel} under {where}); {hint}")
