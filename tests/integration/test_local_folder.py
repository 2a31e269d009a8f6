"""The File Manager adapter's sweep of staged copies, on real folders."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from dais_adapters.localfs import STAGING_FOLDER, LocalFolderStorage
from dais_core.errors import LocationConflict, PublishFailed
from dais_core.rules import parse_location

pytestmark = pytest.mark.integration


def aged(path: Path, data: bytes = b"x") -> Path:
    """A file idle since just before now: past a sweep with no minimum age.

    (A file's change time cannot be set back, so the tests sweep with
    ``min_age=0`` rather than age their files.)
    """
    path.write_bytes(data)
    time.sleep(0.01)
    return path


@pytest.fixture
def storage(tmp_path: Path) -> LocalFolderStorage:
    root = tmp_path / "fm"
    (root / STAGING_FOLDER).mkdir(parents=True)
    return LocalFolderStorage(root)


class TestSweep:
    """Only dead copies go, and nothing outside the staging folder."""

    def test_a_copy_being_written_stays_however_old(self, storage):
        """Its writer holds it locked; being idle alone does not make it dead."""
        staged = storage.stage(parse_location("filemanager://p1/x.bin"))
        staged.write(b"half")
        time.sleep(0.01)
        assert storage.sweep(min_age=0) == 0
        assert staged.temp.exists()
        staged.commit()
        staged.release()
        assert (storage.root / "p1/x.bin").read_bytes() == b"half"

    def test_a_copy_being_written_keeps_no_descriptor_of_the_sweep(self, storage):
        """Leaving a locked copy alone leaves nothing of the sweep's open."""
        staged = storage.stage(parse_location("filemanager://p1/x.bin"))
        staged.write(b"half")
        time.sleep(0.01)
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(3):
            assert storage.sweep(min_age=0) == 0
        assert len(os.listdir("/proc/self/fd")) == before
        staged.abort()

    def test_only_staged_and_previous_files_go(self, storage):
        """A dead .part and .prev go; other names and folders stay."""
        staging = storage.root / STAGING_FOLDER
        aged(staging / "dead.part")
        aged(staging / "dead.prev")
        aged(staging / "notes.txt")
        (staging / "old.part").mkdir()
        assert storage.sweep(min_age=0) == 2
        assert sorted(p.name for p in staging.iterdir()) == ["notes.txt", "old.part"]

    def test_a_staging_folder_that_is_a_link_is_not_followed(self, tmp_path):
        """A link in place of the staging folder leaves its target untouched."""
        victim = tmp_path / "victim"
        victim.mkdir()
        aged(victim / "a.part")
        aged(victim / "b.txt")
        root = tmp_path / "fm"
        root.mkdir()
        (root / STAGING_FOLDER).symlink_to(victim)
        assert LocalFolderStorage(root).sweep(min_age=0) == 0
        assert sorted(p.name for p in victim.iterdir()) == ["a.part", "b.txt"]

    def test_a_staged_file_that_is_a_link_is_not_followed(self, storage, tmp_path):
        """A link named like a staged copy is not a copy: it and its target stay."""
        target = aged(tmp_path / "precious.bin")
        link = storage.root / STAGING_FOLDER / "x.part"
        link.symlink_to(target)
        assert storage.sweep(min_age=0) == 0
        assert link.is_symlink() and target.exists()


class TestFailedCommit:
    """A commit that fails leaves the location and the staging folder clean."""

    def test_no_previous_file_is_left_when_the_rename_fails(self, storage):
        """The kept previous file goes with the aborted copy; the file stays."""
        where = parse_location("filemanager://p1/x.bin")
        (storage.root / "p1").mkdir()
        (storage.root / "p1/x.bin").write_bytes(b"before")
        staged = storage.stage(where)
        staged.write(b"after")
        staged.temp.unlink()  # the rename now has nothing to move
        with pytest.raises(PublishFailed):
            staged.commit()
        staged.abort()
        assert (storage.root / "p1/x.bin").read_bytes() == b"before"
        assert list((storage.root / STAGING_FOLDER).iterdir()) == []

    def test_a_folder_that_came_in_the_way_is_a_conflict(self, storage):
        """A folder made where the file goes while it streamed: a clash, 409."""
        staged = storage.stage(parse_location("filemanager://p1/x.bin"))
        staged.write(b"data")
        (storage.root / "p1/x.bin").mkdir(parents=True)
        with pytest.raises(LocationConflict):
            staged.commit()
        staged.abort()
        assert (storage.root / "p1/x.bin").is_dir()
        assert list((storage.root / STAGING_FOLDER).iterdir()) == []

    def test_a_file_that_came_in_the_way_of_a_folder_is_a_conflict(self, storage):
        """A file made where a folder still to make goes: a clash, 409."""
        (storage.root / "p1").mkdir()
        staged = storage.stage(parse_location("filemanager://p1/d/x.bin"))
        staged.write(b"data")
        (storage.root / "p1/d").write_bytes(b"in the way")
        with pytest.raises(LocationConflict):
            staged.commit()
        staged.abort()
        assert (storage.root / "p1/d").read_bytes() == b"in the way"


class TestLinksInPlace:
    """A link where the file goes is replaced, never followed."""

    def test_a_link_to_a_folder_is_replaced_by_the_file(self, storage, tmp_path):
        """The link gives way; the folder it pointed to is untouched."""
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (storage.root / "p1").mkdir()
        (storage.root / "p1/x.bin").symlink_to(elsewhere)
        staged = storage.stage(parse_location("filemanager://p1/x.bin"))
        staged.write(b"data")
        staged.commit()
        staged.release()
        assert not (storage.root / "p1/x.bin").is_symlink()
        assert (storage.root / "p1/x.bin").read_bytes() == b"data"
        assert list(elsewhere.iterdir()) == []
