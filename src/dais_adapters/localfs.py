"""Local-folder storage: the File Manager as a folder on this machine.

``filemanager://P/inputs/x.csv`` is ``<root>/P/inputs/x.csv``. A staged copy
is written under ``<root>/.dais-staging`` with a unique name (past the page
cache where the filesystem allows, see :mod:`dais_adapters._directio`),
flushed to disk, and renamed over the destination on commit, so readers see
the old file or the new one whole, never a part. The root must be one
filesystem, since a rename cannot cross filesystems.

The destination folder is checked to lie under the root when the copy is
staged, and then held open: the commit renames into that very folder, by
its descriptor, not by a path. An upload may take minutes; a folder on the
path swapped for a symbolic link meanwhile cannot send the file elsewhere.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

from dais_adapters._directio import NewFile
from dais_adapters.hooks import StorageContext, hookimpl
from dais_core.errors import LocationConflict, PublishFailed
from dais_core.ports import Storage
from dais_core.rules import Location

__all__ = ["STAGING_FOLDER", "LocalFolderStorage"]

log = logging.getLogger(__name__)

STAGING_FOLDER = ".dais-staging"
_SUFFIX = ".part"
_PREVIOUS = ".prev"
#: A staged copy is locked by its writer from just after it is made until
#: its rename: one idle and unlocked for this long has no writer left.
_UNLOCKED_GRACE = 2.0


@contextlib.contextmanager
def _translated(action: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise PublishFailed(
            f"the File Manager could not {action}: {exc.strerror}"
        ) from exc


@contextlib.contextmanager
def _clashes() -> Iterator[None]:
    """Report a folder or file that came in the way since staging as a clash."""
    try:
        yield
    except IsADirectoryError as exc:
        raise LocationConflict("a folder now stands where the file goes") from exc
    except NotADirectoryError as exc:
        raise LocationConflict(
            "a file now stands where a folder of the file goes"
        ) from exc


def _is_folder(path: Path) -> bool:
    """Return whether ``path`` itself is a folder (a link to one is not)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)


def _open_folder(real_root: Path, real_folder: Path) -> int:
    """Open a folder under the root one step at a time, following no link.

    ``real_folder`` is resolved already, so it holds no symbolic link; one
    that appears on the way since is refused rather than followed.
    """
    fd = os.open(real_root, _FOLDER_FLAGS)
    try:
        for part in real_folder.relative_to(real_root).parts:
            inner = os.open(part, _FOLDER_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = inner
    except BaseException:
        os.close(fd)
        raise
    return fd


class _StagedFile:
    """A staged copy: a private file that becomes the destination on commit.

    Both folders are held by descriptor, and every step names a file inside
    them. On commit the previous file, if any, is kept as a hard link in
    the staging folder until :meth:`release`, so that :meth:`rollback` can
    put it back if another location of the same publish fails. The
    descriptors are closed once the copy is released, rolled back or
    aborted.
    """

    def __init__(
        self,
        temp: Path,
        destination: Path,
        handle: NewFile,
        folders: tuple[int, int],
        missing: tuple[str, ...] = (),
    ) -> None:
        self.temp = temp
        self.destination = destination
        self.handle = handle
        self.staging_fd, self.folder_fd = folders
        # Folders between the held one and the file, made only on commit, so
        # that a failed upload leaves no empty folders behind.
        self.missing = missing
        # Folders the commit made, each with its parent held open, so that
        # a rollback can take them away again.
        self._made: list[tuple[int, str]] = []
        self.previous: str | None = None
        self.committed = False

    def __del__(self) -> None:
        # A copy dropped without commit or abort (a bug further up) still
        # lets go of its descriptors, its writer and its lock.
        with contextlib.suppress(Exception):
            if self.committed:
                self._close_folders()
            elif self.staging_fd != -1:
                self.abort()

    def write(self, chunk: bytes) -> None:
        with _translated("write the file"):
            self.handle.write(chunk)

    def flushed_path(self) -> Path:
        """Flush what was written and return the staged file, for inspection."""
        with _translated("flush the file"):
            self.handle.flush()
        return self.temp

    def commit(self) -> None:
        name, staging = self.destination.name, self.staging_fd
        with _translated("store the file"), _clashes():
            self.handle.flush()
            os.fsync(self.handle.fileno())
            folder = self._make_missing()
            if self._has_previous():
                previous = f"{uuid.uuid4().hex}{_PREVIOUS}"
                os.link(
                    name,
                    previous,
                    src_dir_fd=folder,
                    dst_dir_fd=staging,
                    follow_symlinks=False,
                )
                self.previous = previous
            os.replace(self.temp.name, name, src_dir_fd=staging, dst_dir_fd=folder)
            self.committed = True
            # Closed only now: until renamed, the copy stays locked.
            self.handle.close()
            os.fsync(folder)
        log.debug("committed %s", self.destination)

    def abort(self) -> None:
        try:
            with _translated("drop a staged file"):
                self.handle.close()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.temp.name, dir_fd=self.staging_fd)
                if self.previous is not None and not self.committed:
                    # The commit kept the previous file, then failed.
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.previous, dir_fd=self.staging_fd)
                    self.previous = None
                self._unmake_folders()
        finally:
            self._close_folders()

    def rollback(self) -> None:
        if not self.committed:
            return
        name, folder = self.destination.name, self.folder_fd
        try:
            with _translated("restore the previous file"):
                if self.previous is not None:
                    os.replace(
                        self.previous,
                        name,
                        src_dir_fd=self.staging_fd,
                        dst_dir_fd=folder,
                    )
                    self.previous = None
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(name, dir_fd=folder)
                os.fsync(folder)
                self._unmake_folders()
        finally:
            self._close_folders()
        log.warning("rolled back %s", self.destination)

    def release(self) -> None:
        try:
            if self.previous is not None:
                with (
                    _translated("drop the previous file"),
                    contextlib.suppress(FileNotFoundError),
                ):
                    os.unlink(self.previous, dir_fd=self.staging_fd)
                self.previous = None
        finally:
            self._close_folders()

    def _make_missing(self) -> int:
        """Make the folders still missing, one step at a time, following no link."""
        for part in self.missing:
            parent = self.folder_fd
            try:
                os.mkdir(part, dir_fd=parent)
            except FileExistsError:
                made = False
            else:
                made = True
                os.fsync(parent)
            self.folder_fd = os.open(part, _FOLDER_FLAGS | os.O_NOFOLLOW, dir_fd=parent)
            if made:
                self._made.append((parent, part))
            else:
                os.close(parent)
        self.missing = ()
        return self.folder_fd

    def _unmake_folders(self) -> None:
        """Remove the folders the commit made, deepest first, while empty."""
        for parent, part in reversed(self._made):
            try:
                os.rmdir(part, dir_fd=parent)
            except OSError:
                return  # someone else's file landed there meanwhile
            os.fsync(parent)

    def _has_previous(self) -> bool:
        try:
            status = os.stat(
                self.destination.name, dir_fd=self.folder_fd, follow_symlinks=False
            )
        except FileNotFoundError:
            return False
        return not stat.S_ISDIR(status.st_mode)

    def _close_folders(self) -> None:
        held = {self.staging_fd, self.folder_fd, *(fd for fd, _ in self._made)}
        for fd in held - {-1}:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.staging_fd = self.folder_fd = -1
        self._made = []


class LocalFolderStorage:
    """The ``filemanager`` scheme on a local folder.

    Args:
        root: The folder that holds one subfolder per project.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.staging = root / STAGING_FOLDER

    def path_of(self, location: Location) -> tuple[Path, tuple[str, ...]]:
        """Return the file a location names, and the folders still to make.

        The file's path starts at the deepest folder on the way that exists,
        resolved and checked to lie under the root, so that a symbolic link
        cannot lead the file, or the folders made for it, outside the root.

        Raises:
            LocationConflict: A folder is where the file goes, or a file
                where one of its folders goes.
            PublishFailed: The location names a folder, or resolves
                (through a symbolic link, say) outside the root.
        """
        if location.is_folder:
            raise PublishFailed(f"{location.uri} names a folder, not a file")
        path = self.root / location.authority / location.path
        missing: list[str] = []
        with _translated("reach the destination folder"):
            self.root.mkdir(parents=True, exist_ok=True)
            real_root = self.root.resolve()
            existing = path.parent
            while not existing.exists():
                missing.insert(0, existing.name)
                existing = existing.parent
            real_existing = existing.resolve()
            in_a_folder = stat.S_ISDIR(os.stat(real_existing).st_mode)
            # A link in its place is replaced, never followed: not a clash.
            a_folder = in_a_folder and not missing and _is_folder(path)
        self._contained(real_existing, real_root, location)
        if not in_a_folder:
            raise LocationConflict(
                f"a file in the File Manager stands where a folder of "
                f"{location.uri} goes"
            )
        if a_folder:
            raise LocationConflict(f"{location.uri} is a folder in the File Manager")
        return real_existing.joinpath(*missing, path.name), tuple(missing)

    @staticmethod
    def _contained(real: Path, real_root: Path, location: Location) -> None:
        if real != real_root and real_root not in real.parents:
            raise PublishFailed(f"{location.uri} leads outside the File Manager")

    def stage(self, location: Location) -> _StagedFile:
        """Open a staged copy for ``location``.

        Raises:
            PublishFailed: The location is unsafe or the disk refuses.
        """
        destination, missing = self.path_of(location)
        real_root = self.root.resolve()
        staging_fd = self._open_staging(real_root, "stage the file")
        try:
            with _translated("reach the destination folder"):
                held = destination.parents[len(missing)]
                folder_fd = _open_folder(real_root, held)
        except BaseException:
            os.close(staging_fd)
            raise
        name, handle = _new_part(staging_fd, "stage the file", staging_fd, folder_fd)
        temp = real_root / STAGING_FOLDER / name
        folders = (staging_fd, folder_fd)
        return _locked(_StagedFile(temp, destination, handle, folders, missing))

    def scratch(self) -> _StagedFile:
        """Open a private copy in the staging folder that no location takes.

        For an inspector that must read a file no staged copy holds locally;
        it is only ever aborted (a copy left by a killed process is swept as
        any other).

        Raises:
            PublishFailed: The disk refuses.
        """
        real_root = self.root.resolve()
        staging_fd = self._open_staging(real_root, "stage a copy to check")
        name, handle = _new_part(staging_fd, "stage a copy to check", staging_fd)
        temp = real_root / STAGING_FOLDER / name
        return _locked(_StagedFile(temp, temp, handle, (staging_fd, staging_fd)))

    def _open_staging(self, real_root: Path, action: str) -> int:
        with _translated(action):
            self.staging.mkdir(parents=True, exist_ok=True)
            return _open_folder(real_root, real_root / STAGING_FOLDER)

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

        Previous files kept for a rollback (``.prev``) untouched for
        ``min_age`` seconds are removed, and so are staged copies (``.part``)
        that nobody holds locked and that were untouched for a couple of
        seconds (or ``min_age``, if shorter): a copy being written is locked
        by its writer (``flock``) and left alone whatever its age, and other
        entries are never touched. A ``.prev`` is not locked, and another
        gateway sharing the folder may be committing with it, so ``serve``
        passes the request deadline as ``min_age``. A staging folder that is
        a symbolic link is not followed.
        """
        real_root = self.root.resolve()
        try:
            folder = _open_folder(real_root, real_root / STAGING_FOLDER)
        except FileNotFoundError:
            return 0
        except OSError as exc:
            log.warning("not sweeping %s: %s", self.staging, exc.strerror)
            return 0
        removed = 0
        try:
            now = time.time()
            cutoffs = {
                _SUFFIX: now - min(min_age, _UNLOCKED_GRACE),
                _PREVIOUS: now - min_age,
            }
            for name in os.listdir(folder):
                suffix = os.path.splitext(name)[1]
                cutoff = cutoffs.get(suffix)
                if cutoff is not None and _remove_if_stale(folder, name, cutoff):
                    removed += 1
        finally:
            os.close(folder)
        if removed:
            log.warning("removed %d stale staged files from %s", removed, self.staging)
        return removed


def _new_part(staging_fd: int, action: str, *held: int) -> tuple[str, NewFile]:
    """Create a staged file in the staging folder; close ``held`` if that fails."""
    try:
        with _translated(action):
            name = f"{uuid.uuid4().hex}{_SUFFIX}"
            return name, NewFile(Path(name), dir_fd=staging_fd)
    except BaseException:
        for fd in held:
            os.close(fd)
        raise


def _locked(staged: _StagedFile) -> _StagedFile:
    """Lock a staged copy until it is renamed or dropped, and return it.

    The sweep of any process leaves a locked copy alone, however old.
    """
    try:
        with _translated("lock the staged file"):
            fcntl.flock(staged.handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        staged.abort()
        raise
    return staged


def _remove_if_stale(folder: int, name: str, cutoff: float) -> bool:
    """Remove a regular file idle since ``cutoff`` that nobody holds locked."""
    try:
        status = os.stat(name, dir_fd=folder, follow_symlinks=False)
        if not stat.S_ISREG(status.st_mode):
            return False
        if max(status.st_mtime, status.st_ctime) > cutoff:
            return False
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("not sweeping staged file %s: %s", name, exc.strerror)
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.unlink(name, dir_fd=folder)
    except BlockingIOError:
        return False  # its writer is alive
    except FileNotFoundError:
        return False
    finally:
        os.close(fd)
    return True


@hookimpl
def dais_storages(context: StorageContext) -> Mapping[str, Storage]:
    """Serve ``filemanager://`` locations from the File Manager folder."""
    storage: Storage = LocalFolderStorage(context.filemanager_root)
    return {"filemanager": storage}
