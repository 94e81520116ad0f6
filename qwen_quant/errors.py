"""One error type for everything a user can fix.

The CLI turns a ``QuantError`` into a single line on stderr and exit code 2, so every
message must say what is wrong *and* what to do about it, in one sentence.
"""


class QuantError(Exception):
    """A user-fixable problem: bad input, missing files, unsupported options."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))
