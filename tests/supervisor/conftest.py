"""The supervisor tests need neither Django nor RabbitMQ.

tests/conftest.py sets up a RabbitMQ vhost and empties the carrot queues around every test with
autouse fixtures; the fixtures below take their names for the tests in this directory, so the
supervisor can be tested where no broker runs (and with `-p no:django`).
"""

import pytest


@pytest.fixture(scope="session", autouse=True)
def carrot_vhost():
    yield None


@pytest.fixture(autouse=True)
def empty_queues():
    yield


@pytest.fixture
def start_master(tmp_path):
    """A function that starts tests/supervisor/sample_master.py (tests.harness.SampleMaster) processes;
    all of them are gone after the test."""
    from tests.harness import SampleMaster
    masters = []

    def start(groups, **kwargs):
        master = SampleMaster(tmp_path / f"master{len(masters)}", groups, **kwargs)
        masters.append(master)
        return master

    yield start
    for master in masters:
        master.cleanup()
