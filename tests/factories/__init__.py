"""Plain helpers the test modules share: declarations, rows and tables to test with, loaders and
views of what the code under test wrote. Fixtures live in the conftest.py files; no test module
imports another."""
