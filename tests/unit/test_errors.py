"""The error tree of dais_core.errors and the status each error stands for."""

from __future__ import annotations

import re

import pytest

from dais_core import errors
from dais_core.errors import (
    STATUS_BY_ERROR,
    Busy,
    CorruptData,
    DaisError,
    Forbidden,
    IncompleteBody,
    InvalidData,
    InvalidResourceId,
    InvalidRoute,
    LocationConflict,
    NotFound,
    PublishFailed,
    RequestTimeout,
    Throttled,
    TooLarge,
    Unauthenticated,
    UnauthorisedPublish,
    Unavailable,
    UnsupportedType,
    UpstreamTimeout,
    UpstreamUnreachable,
    status_for,
)

# The status table of SPEC.md, row by row, plus the statuses the error module
# adds (408, 409, 503) and the root.
SPEC_STATUSES = [
    (InvalidData, 400),
    (InvalidRoute, 400),
    (InvalidResourceId, 400),
    (CorruptData, 400),
    (IncompleteBody, 400),
    (Unauthenticated, 401),
    (UnauthorisedPublish, 401),
    (Forbidden, 403),
    (NotFound, 404),
    (RequestTimeout, 408),
    (TooLarge, 413),
    (UnsupportedType, 415),
    (Throttled, 429),
    (PublishFailed, 500),
    (LocationConflict, 409),
    (UpstreamUnreachable, 502),
    (Unavailable, 503),
    (Busy, 503),
    (UpstreamTimeout, 504),
    (DaisError, 500),
]

ALL_ERRORS = [
    getattr(errors, name)
    for name in errors.__all__
    if isinstance(getattr(errors, name), type)
]


def _make(cls: type[DaisError]) -> DaisError:
    if cls is Throttled:
        return Throttled("slow down", retry_after=1.0)
    if cls is Busy:
        return Busy("busy", retry_after=1.0)
    return cls("something happened")


class TestStatusFor:
    @pytest.mark.parametrize(
        ("cls", "status"), SPEC_STATUSES, ids=[c.__name__ for c, _ in SPEC_STATUSES]
    )
    def test_each_error_maps_to_its_spec_status(self, cls, status):
        """Every error class answers with the status the SPEC table gives it."""
        assert status_for(_make(cls)) == status

    def test_every_error_class_is_in_the_spec_table(self):
        """No exported error class is left without a row in the table above."""
        assert set(ALL_ERRORS) == {cls for cls, _ in SPEC_STATUSES}

    def test_an_unlisted_subclass_takes_its_nearest_ancestors_status(self):
        """A subclass not in the mapping inherits the status of its parent."""

        class StorageFull(PublishFailed):
            code = "storage_full"

        class BadCsvHeader(CorruptData):
            code = "bad_csv_header"

        assert status_for(StorageFull("full")) == 500
        assert status_for(BadCsvHeader("no header")) == 400

    def test_the_mapping_only_holds_dais_errors(self):
        """The status table is keyed by domain errors only."""
        assert all(issubclass(cls, DaisError) for cls in STATUS_BY_ERROR)


class TestErrorTree:
    def test_codes_are_unique(self):
        """Each error class has its own machine-readable code."""
        codes = [cls.code for cls in ALL_ERRORS]
        assert len(codes) == len(set(codes))

    @pytest.mark.parametrize(
        ("child", "parent"),
        [
            (InvalidRoute, InvalidData),
            (InvalidResourceId, InvalidData),
            (CorruptData, InvalidData),
            (UnauthorisedPublish, Unauthenticated),
        ],
        ids=lambda c: c.__name__,
    )
    def test_refined_errors_subclass_their_family(self, child, parent):
        """Refined errors can be caught as the broader error they refine."""
        assert issubclass(child, parent)

    def test_the_drawn_tree_matches_the_classes(self):
        """The tree drawn in the module docstring gives each class's status and code."""
        drawn = re.findall(r"(\w+)\s+(\d{3})(?: ([a-z_]+))?", errors.__doc__ or "")
        assert len(drawn) == len(ALL_ERRORS)
        for name, status, code in drawn:
            cls = getattr(errors, name)
            assert status_for(_make(cls)) == int(status)
            if code:
                assert cls.code == code


class TestBody:
    def test_body_has_code_message_and_detail(self):
        """The JSON body carries the stable code, the message and the detail."""
        error = InvalidData("bad digest", sha256="ab" * 32)
        assert error.body() == {
            "error": "invalid_data",
            "message": "bad digest",
            "sha256": "ab" * 32,
        }

    def test_throttled_keeps_its_retry_after_and_decision(self):
        """A throttled error carries when to retry and the decision behind it."""
        error = Throttled("slow down", retry_after=2.5, decision="d")
        assert (error.retry_after, error.decision) == (2.5, "d")
        assert error.body() == {"error": "throttled", "message": "slow down"}

    def test_the_message_is_the_exception_text(self):
        """str() of an error is its human message."""
        assert str(NotFound("no project 'p'")) == "no project 'p'"
