"""Error types that the CLI turns into a one-line message and exit code 2.

Why a dedicated type: anything raised as ``UserError`` is the user's input being unusable
(missing file, bad option, a model we cannot process). The CLI prints it without a traceback;
any other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An input or option that cannot be processed; the message says what to do."""
