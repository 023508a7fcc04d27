"""``llm-core new-backend``: write a ready-to-install backend plugin package (being written)."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    subparsers.add_parser("new-backend", help="write a new backend plugin package")
