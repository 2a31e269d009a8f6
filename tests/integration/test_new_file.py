"""Staged copies written past the page cache, on real files."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from dais_adapters._directio import BLOCK, BLOCKS, NewFile
from tests.child import run_python

TMPFS = Path("/dev/shm")


def direct_allowed(folder: Path) -> bool:
    """Whether this filesystem takes ``O_DIRECT`` (ext4 and xfs do, tmpfs not)."""
    probe = folder / "probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except (OSError, AttributeError):
        return False
    os.close(fd)
    probe.unlink()
    return True


def write_in_pieces(target: NewFile, data: bytes, seed: int) -> None:
    """Write ``data`` in pieces of random sizes, some larger than a block."""
    pick = random.Random(seed)
    view = memoryview(data)
    while view:
        size = pick.choice([1, 7, 4096, 65_537, BLOCK - 3, BLOCK, 3 * BLOCK + 5])
        target.write(view[:size])
        view = view[size:]


SIZES = [0, 1, 4095, 4096, BLOCK - 1, BLOCK, BLOCK + 1, (BLOCKS + 3) * BLOCK + 12345]


class TestNewFile:
    """The file on disk holds exactly the bytes written, in order."""

    @pytest.mark.parametrize("size", SIZES)
    def test_bytes_survive_every_block_boundary(
        self, tmp_path: Path, size: int
    ) -> None:
        """Sizes on, under and over block boundaries come out byte for byte."""
        data = os.urandom(size)
        target = NewFile(tmp_path / "f.part")
        write_in_pieces(target, data, seed=size)
        target.flush()
        os.fsync(target.fileno())
        target.close()
        assert (tmp_path / "f.part").read_bytes() == data

    def test_writes_past_the_cache_where_the_filesystem_allows(
        self, tmp_path: Path
    ) -> None:
        """On a disk filesystem the file is opened with O_DIRECT."""
        if not direct_allowed(tmp_path):
            pytest.skip("this filesystem refuses O_DIRECT")
        target = NewFile(tmp_path / "f.part")
        try:
            assert target.direct
            assert os.O_DIRECT & _fd_flags(target.fileno())
            target.write(os.urandom(2 * BLOCK + 10))
            target.flush()
            assert not os.O_DIRECT & _fd_flags(target.fileno())
        finally:
            target.close()
        assert (tmp_path / "f.part").stat().st_size == 2 * BLOCK + 10

    def test_tmpfs_writes_direct_only_where_it_allows(self, tmp_path: Path) -> None:
        """On tmpfs (which refuses O_DIRECT before Linux 6.6) the file is
        written all the same, past the cache only if tmpfs takes it."""
        if not TMPFS.is_dir():
            pytest.skip("no /dev/shm on this machine")
        path = TMPFS / f"dais-test-{os.getpid()}-{tmp_path.name}.part"
        data = os.urandom(3 * BLOCK + 1)
        try:
            target = NewFile(path)
            assert target.direct == direct_allowed(TMPFS)
            write_in_pieces(target, data, seed=3)
            target.flush()
            target.close()
            assert path.read_bytes() == data
        finally:
            path.unlink(missing_ok=True)

    def test_page_cache_on_request(self, tmp_path: Path) -> None:
        """``direct=False`` writes the same bytes through the page cache."""
        data = os.urandom(BLOCK + 99)
        target = NewFile(tmp_path / "f.part", direct=False)
        assert not target.direct
        write_in_pieces(target, data, seed=1)
        target.flush()
        target.close()
        assert (tmp_path / "f.part").read_bytes() == data

    def test_an_existing_file_is_never_opened(self, tmp_path: Path) -> None:
        """A staged name that exists already is an error, not an overwrite."""
        (tmp_path / "f.part").write_bytes(b"keep")
        with pytest.raises(FileExistsError):
            NewFile(tmp_path / "f.part")
        assert (tmp_path / "f.part").read_bytes() == b"keep"

    def test_close_without_flush_stops_the_writer(self, tmp_path: Path) -> None:
        """An aborted copy closes at once, leaving no thread behind."""
        target = NewFile(tmp_path / "f.part")
        target.write(os.urandom(BLOCKS * BLOCK * 2))
        target.close()
        target.close()
        assert target._thread is None
        with pytest.raises(ValueError, match="closed"):
            target.write(b"x")


def _fd_flags(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL)


def test_a_failed_write_on_the_writer_thread_reaches_the_caller(
    tmp_path: Path,
) -> None:
    """A disk error on the writer thread is raised to the writer's caller.

    The child process caps its file size (``RLIMIT_FSIZE``) so that the
    second block's write fails with ``EFBIG`` on the writer thread.
    """
    script = f"""
        import errno, os, resource, signal, sys
        from pathlib import Path
        from dais_adapters._directio import BLOCK, NewFile
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (BLOCK, BLOCK))
        target = NewFile(Path({str(tmp_path / "f.part")!r}))
        try:
            for _ in range(8):
                target.write(b"x" * BLOCK)
            target.flush()
        except OSError as exc:
            print("raised", errno.errorcode[exc.errno])
        else:
            print("no error")
        target.close()
        """
    assert run_python(script).strip() == "raised EFBIG"


@pytest.mark.parametrize(
    ("limit", "size"),
    [
        # The tail, written through the page cache by flush(), is refused.
        ("BLOCK", "BLOCK + 5"),
        # The second block's direct write is cut short, and the rest refused.
        ("BLOCK + BLOCK // 2", "3 * BLOCK"),
    ],
    ids=["tail", "short-block"],
)
def test_a_file_whose_write_failed_closes_while_the_error_is_handled(
    tmp_path: Path, limit: str, size: str
) -> None:
    """close() frees every block even while the write's error is in hand.

    The error's traceback may still hold a slice of a block; closing the
    file then must neither fail nor keep the descriptor open.
    """
    script = f"""
        import errno, os, resource, signal, sys
        from pathlib import Path
        from dais_adapters._directio import BLOCK, NewFile
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        target = NewFile(Path({str(tmp_path / "f.part")!r}))
        try:
            target.write(b"x" * ({size}))
            target.flush()
        except OSError as exc:
            fd = target.fileno()
            target.close()
            try:
                os.fstat(fd)
            except OSError:
                print("raised", errno.errorcode[exc.errno], "and closed")
            else:
                print("still open")
        else:
            print("no error")
        """
    assert run_python(script).strip() == "raised EFBIG and closed"
