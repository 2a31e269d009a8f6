"""Local-folder storage: the File Manager as a folder on this machine.

``filemanager://P/inputs/x.csv`` is ``<root>/P/inputs/x.csv``. A staged copy
is written under ``<root>/.dais-staging`` with a unique name (past the page
cache where the filesystem allows, see :mod:`dais_adapters._directio`),
flushed to disk, and renamed over the destination on commit, so readers see
the old file or the new one whole, never a part. The root must be one
filesystem, since a rename cannot cross filesystems.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

from dais_adapters._directio import NewFile
from dais_adapters.hooks import StorageContext, hookimpl
from dais_core.errors import PublishFailed
from dais_core.ports import Storage
from dais_core.rules import Location

__all__ = ["STAGING_FOLDER", "LocalFolderStorage"]

log = logging.getLogger(__name__)

STAGING_FOLDER = ".dais-staging"
_SUFFIX = ".part"
_PREVIOUS = ".prev"


@contextlib.contextmanager
def _translated(action: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise PublishFailed(
            f"the File Manager could not {action}: {exc.strerror}"
        ) from exc


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _StagedFile:
    """A staged copy: a private file that becomes the destination on commit.

    On commit the previous file, if any, is kept as a hard link in the
    staging folder until :meth:`release`, so that :meth:`rollback` can put it
    back if another location of the same publish fails.
    """

    def __init__(
        self, temp: Path, destination: Path, handle: NewFile, staging: Path
    ) -> None:
        self.temp = temp
        self.destination = destination
        self.handle = handle
        self.staging = staging
        self.previous: Path | None = None
        self.committed = False

    def write(self, chunk: bytes) -> None:
        with _translated("write the file"):
            self.handle.write(chunk)

    def flushed_path(self) -> Path:
        """Flush what was written and return the staged file, for inspection."""
        with _translated("flush the file"):
            self.handle.flush()
        return self.temp

    def commit(self) -> None:
        with _translated("store the file"):
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()
            if self.destination.is_file():
                previous = self.staging / f"{uuid.uuid4().hex}{_PREVIOUS}"
                os.link(self.destination, previous)
                self.previous = previous
            os.replace(self.temp, self.destination)
            self.committed = True
            _fsync_folder(self.destination.parent)
        log.debug("committed %s", self.destination)

    def abort(self) -> None:
        with _translated("drop a staged file"):
            self.handle.close()
            self.temp.unlink(missing_ok=True)

    def rollback(self) -> None:
        if not self.committed:
            return
        with _translated("restore the previous file"):
            if self.previous is not None:
                os.replace(self.previous, self.destination)
                self.previous = None
            else:
                self.destination.unlink(missing_ok=True)
            _fsync_folder(self.destination.parent)
        log.warning("rolled back %s", self.destination)

    def release(self) -> None:
        if self.previous is not None:
            with _translated("drop the previous file"):
                self.previous.unlink(missing_ok=True)
            self.previous = None


class LocalFolderStorage:
    """The ``filemanager`` scheme on a local folder.

    Args:
        root: The folder that holds one subfolder per project.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.staging = root / STAGING_FOLDER

    def path_of(self, location: Location) -> Path:
        """Return the file a location names, checked to stay under the root.

        The check runs before any folder is made, on the deepest folder that
        exists, and again once the folders are there, so a symbolic link
        cannot lead the creation of folders outside the root.

        Raises:
            PublishFailed: The location is a folder, or resolves (through a
                symbolic link, say) outside the root.
        """
        if location.is_folder:
            raise PublishFailed(f"{location.uri} names a folder, not a file")
        path = self.root / location.authority / location.path
        with _translated("create the destination folder"):
            self.root.mkdir(parents=True, exist_ok=True)
            real_root = self.root.resolve()
            existing = path.parent
            while not existing.exists():
                existing = existing.parent
            self._contained(existing.resolve(), real_root, location)
            path.parent.mkdir(parents=True, exist_ok=True)
            real_parent = path.parent.resolve()
        self._contained(real_parent, real_root, location)
        if path.is_dir():
            raise PublishFailed(f"{location.uri} is a folder in the File Manager")
        return real_parent / path.name

    @staticmethod
    def _contained(real: Path, real_root: Path, location: Location) -> None:
        if real != real_root and real_root not in real.parents:
            raise PublishFailed(f"{location.uri} leads outside the File Manager")

    def stage(self, location: Location) -> _StagedFile:
        """Open a staged copy for ``location``.

        Raises:
            PublishFailed: The location is unsafe or the disk refuses.
        """
        destination = self.path_of(location)
        with _translated("stage the file"):
            self.staging.mkdir(parents=True, exist_ok=True)
            temp = self.staging / f"{uuid.uuid4().hex}{_SUFFIX}"
            handle = NewFile(temp)
        return _StagedFile(temp, destination, handle, self.staging)

    def ping(self) -> None:
        """Check the File Manager folder exists (or can be made) and is writable.

        Raises:
            PublishFailed: It cannot be used.
        """
        with _translated("reach its folder"):
            self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise PublishFailed("the File Manager folder is not writable")

    def sweep(self, min_age: float = 0.0) -> int:
        """Remove staged copies left by a process that died; return how many.

        Staged copies (``.part``) and the previous files kept for a rollback
        (``.prev``) untouched for ``min_age`` seconds are removed. Other
        gateways sharing the folder may have uploads in flight: a copy being
        written is touched continuously, and one stalled longer than the
        request deadline has been given up, so ``serve`` passes that
        deadline.
        """
        removed = 0
        if not self.staging.is_dir():
            return removed
        cutoff = time.time() - min_age
        for stale in self.staging.iterdir():
            with contextlib.suppress(FileNotFoundError):
                status = stale.stat()
                if max(status.st_mtime, status.st_ctime) > cutoff:
                    continue
                stale.unlink()
                removed += 1
        if removed:
            log.warning("removed %d stale staged files from %s", removed, self.staging)
        return removed


@hookimpl
def dais_storages(context: StorageContext) -> Mapping[str, Storage]:
    """Serve ``filemanager://`` locations from the File Manager folder."""
    storage: Storage = LocalFolderStorage(context.filemanager_root)
    return {"filemanager": storage}
