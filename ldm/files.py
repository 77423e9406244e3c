"""Writing files so that nothing is lost or half-written: temporary names (of files or folders) that say which
process made them, removal of the ones a killed process left behind, the user's umask for what we create, and a
write probe for output folders."""

import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path

from ldm.errors import UserError

PROBE_BYTES = 256 * 1024  # about one PNG: what the output-folder probe writes
_TEMPORARY = re.compile(r"^\..+\.(\d+)-[0-9a-f]{8}\.tmp$")


def temporary_path(path: Path) -> Path:
    """A hidden name beside `path` to write to before renaming: `.NAME.PID-RANDOM.tmp`."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def remove_stale_temporaries(folder: Path) -> int:
    """Remove the temporary files and folders in `folder` (of `temporary_path`'s naming) whose process is gone,
    as a killed run leaves them. Returns how many were removed."""
    removed = 0
    try:
        names = os.listdir(folder)
    except OSError:
        return 0
    for name in names:
        match = _TEMPORARY.match(name)
        if match and int(match[1]) != os.getpid() and not _alive(int(match[1])):
            try:
                if (folder / name).is_dir():
                    shutil.rmtree(folder / name)
                else:
                    os.unlink(folder / name)
                removed += 1
            except OSError:
                pass
    return removed


def file_mode() -> int:
    """The permission bits a new file gets from this process's umask (0o666 & ~umask)."""
    with open("/proc/self/status") if os.path.exists("/proc/self/status") else open(os.devnull) as status:
        for line in status:
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    umask = os.umask(0o022)  # no /proc: read it by setting it (and put it back at once)
    os.umask(umask)
    return 0o666 & ~umask


def check_output_folder(folder: str, flag: str = "--outdir") -> Path:
    """Refuse an output folder that cannot be written, before any work: it (or the nearest part of it that
    exists) must be a folder we can create a file in. Nothing is created when it does not exist yet."""
    if not folder or not folder.strip():
        raise UserError(f"{flag} is empty: pass the folder to write into (e.g. {flag} outputs)")
    path = Path(folder).expanduser()
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        what = "is" if existing == path else f"is under {existing}, which is"
        raise UserError(f"{flag} {folder} {what} not a folder: pass a folder path")
    try:
        with tempfile.TemporaryFile(dir=existing) as probe:  # a full disk fails here, not after sampling
            probe.write(bytes(PROBE_BYTES))
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as error:
        reason = error.strerror or str(error)
        raise UserError(
            f"{flag} {folder}: cannot write in {existing} ({reason}): pass a writable folder"
        ) from None
    return path
