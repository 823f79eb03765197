"""Test helpers shared across qdit's test suites."""
