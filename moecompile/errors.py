"""Error types that map onto the CLI's exit codes.

A `UserError` is anything the user can fix (bad input, impossible request, a model the target
cannot run faithfully): the CLI prints its message on one line and exits with code 2.
A `VerificationError` means an export was written but does not compute what it should (exit 1).
An `InternalError` is a bug of moecompile's own, e.g. a pass that left a broken IR (exit 3).
"""


class UserError(Exception):
    """Bad input or an impossible request; the message is shown to the user as is."""


class VerificationError(Exception):
    """The exported file disagrees with the reference executor."""


class InternalError(Exception):
    """A bug: moecompile broke one of its own invariants; the message names where."""
