"""Durable small-file writes shared by the passport store and the kill-switch state."""

from __future__ import annotations

import os

__all__ = ["write_private_atomic", "secure_tree", "PRIVATE_DIR_MODE", "PRIVATE_FILE_MODE"]


def write_private_atomic(path: str, data: bytes) -> None:
    """Write `data` to `path` with mode 0600 from the first byte, atomically and durably: a temp
    file is fsynced, renamed over `path`, then the directory is fsynced, so after a crash or a
    power cut the file holds either the old or the new bytes, never a mix, never world-readable."""
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# -- permissions of a state directory (issue 12 item 6) ------------------------------------------

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
# A state dir holds a few hundred files (WAL segments, JetStream blocks): walking it at start is
# cheap, but a runaway tree must not stall a start: past this many entries the walk stops.
MAX_SECURED_ENTRIES = 200_000


def secure_tree(root: str, max_entries: int = MAX_SECURED_ENTRIES) -> int:
    """Create `root` if needed and force it, every directory below it to 0700 and every regular
    file to 0600 (symlinks are not followed). Returns how many modes were changed.

    Called on every start of the Mixer and of a joined Rack: a state dir made earlier by
    another tool, an older version or a restored backup may hold group/other-readable files
    (keys, the registry, bus credentials, WAL records with card data)."""
    os.makedirs(root, mode=PRIVATE_DIR_MODE, exist_ok=True)
    changed = 0
    seen = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name, want in [(dirpath, PRIVATE_DIR_MODE)] + [
            (os.path.join(dirpath, f), PRIVATE_FILE_MODE) for f in filenames
        ]:
            seen += 1
            if seen > max_entries:
                return changed
            try:
                st = os.lstat(name)
            except OSError:
                continue  # removed meanwhile (a WAL segment deleted on ack)
            if os.path.islink(name):
                continue
            if (st.st_mode & 0o777) != want and (os.path.isdir(name) or os.path.isfile(name)):
                try:
                    os.chmod(name, want)
                    changed += 1
                except OSError:
                    pass
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    return changed
