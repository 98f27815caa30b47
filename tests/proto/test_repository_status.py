"""The retained repository status: round trip, and refusal of what is not one."""

import pytest

from setpoint.proto import SchemaError, Topics, repository
from setpoint.proto.repository import BranchStatus, Problem, RepositoryStatus


def _refused() -> BranchStatus:
    return BranchStatus(
        branch="main",
        head="746209c" + "0" * 33,
        accepted=False,
        checked_at=1700000000.5,
        subject="add motd",
        problems=(Problem("groups/kiosks.yaml", 4, "resource 'motd': unknown kind 'fiel'"),),
    )


def test_round_trip_keeps_every_field() -> None:
    status = RepositoryStatus({}).with_branch(_refused())
    assert repository.from_json(status.to_json()) == status
    assert status.refused == (_refused(),)


def test_problem_reads_as_file_line_message() -> None:
    assert str(_refused().problems[0]) == (
        "groups/kiosks.yaml:4: resource 'motd': unknown kind 'fiel'"
    )
    assert str(Problem(None, None, "the tree is empty")) == "the tree is empty"


@pytest.mark.parametrize(
    "data",
    [
        b"[]",
        b'{"schema": 2, "branches": {}}',
        b'{"schema": 1}',
        b'{"schema": 1, "branches": {"main": {"branch": "main"}}}',
        b'{"schema": 1, "branches": {"main": {"branch": "main", "head": "a",'
        b' "accepted": "yes", "checked_at": 1}}}',
        b'{"schema": 1, "branches": {"main": {"branch": "main", "head": "a",'
        b' "accepted": false, "checked_at": 1, "problems": [{"line": "x", "message": "m"}]}}}',
    ],
)
def test_malformed_status_is_a_schema_error(data: bytes) -> None:
    with pytest.raises(SchemaError):
        repository.from_json(data)


def test_topic_is_under_the_prefix() -> None:
    assert Topics("site/a").repository_status() == "site/a/repository/status"
