"""A storage wrapper whose copies stage and write fine but fail to commit."""

from __future__ import annotations

from dais_core.errors import PublishFailed
from dais_core.ports import StagedWrite, Storage
from dais_core.rules import Location

__all__ = ["RefusingCommit", "RefusingStorage"]


class RefusingCommit:
    """A staged copy whose commit fails, as a broken disk would."""

    def __init__(self, staged: StagedWrite) -> None:
        self.staged = staged

    def write(self, chunk: bytes) -> None:
        self.staged.write(chunk)

    def commit(self) -> None:
        raise PublishFailed("the disk refused the rename")

    def abort(self) -> None:
        self.staged.abort()

    def rollback(self) -> None:
        self.staged.rollback()

    def release(self) -> None:
        self.staged.release()


class RefusingStorage:
    """A storage whose copies all fail to commit."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def stage(self, location: Location) -> StagedWrite:
        return RefusingCommit(self.storage.stage(location))
