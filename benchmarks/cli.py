"""Argument checks shared by the benchmark scripts: a bad option exits 2 with a message naming it and the value."""

import argparse


def method_list(parser: argparse.ArgumentParser, text: str, allowed) -> list[str]:
    """``--methods``: comma-separated distinct names from ``allowed``."""
    methods = text.split(",")
    if not set(methods) <= set(allowed) or len(set(methods)) != len(methods):
        parser.error(f"--methods: expected distinct names from {', '.join(allowed)}, got {text}")
    return methods


def at_least(parser: argparse.ArgumentParser, args: argparse.Namespace, low: int, *names: str) -> None:
    """Every option of ``names`` an int >= ``low``."""
    for name in names:
        if getattr(args, name) < low:
            parser.error(f"--{name}: expected an int >= {low}, got {getattr(args, name)}")
