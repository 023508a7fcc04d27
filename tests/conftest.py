"""Shared fixtures: the checkpoint builders of conftest_loaders are plugins of every test."""

pytest_plugins = ["conftest_loaders"]
