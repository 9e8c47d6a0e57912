"""The one error family users see.

Every mistake a user can make (a bad code, a bad override, unreadable data, a checkpoint from
another architecture...) raises a subclass of :class:`UserError` with a one-line message saying
what is wrong and how to fix it. The command-line dispatcher prints that line and exits with 2;
any other exception is a bug and exits with 1.
"""


class UserError(ValueError):
    """Bad input from the user. ``str(err)`` is the one line shown to them."""
