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
