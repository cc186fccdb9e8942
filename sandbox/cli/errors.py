"""Errors shared by the command-line front ends."""


class CliError(Exception):
    """Bad command-line input: one clear line, exit status 2."""
