"""The error type for mistakes a user can fix (bad flags, files, data).

Binaries print a ``UserError`` as one line on stderr and exit non-zero without a
traceback; any other exception is a bug and keeps its traceback.
"""


class UserError(ValueError):
  """Bad user input; the message names the input, what was expected and the fix."""
