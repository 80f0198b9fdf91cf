"""Helpers shared by the test suites: waiting, workflows, Kafka and ClickHouse helpers, and
the fault harness (``tests.support.faults``)."""
