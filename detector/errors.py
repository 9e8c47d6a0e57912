"""The one error family users see.

Every mistake a user can make (a bad code, a bad override, unreadable data, a checkpoint from
another architecture...) raises a subclass of :class:`UserError` with a one-line message saying
what is wrong and how to fix it. The command-line dispatcher prints that line and exits with 2;
any other exception is a bug and exits with 1.
"""


class UserError(ValueError):
    """Bad input from the user. ``str(err)`` is the one line shown to them."""


class WriteError(UserError, OSError):
    """A file could not be written: disk full, quota or file-size limit, read-only folder.

    Raised by the writers of run state (checkpoints, searcher state, feature caches, history) in
    place of the raw failure, whose text is often cryptic (``torch.save`` reports a short write as
    ``unexpected pos``). Files written before are intact: every writer writes atomically. It is
    an :class:`OSError` too (``errno`` is the original one when there was one).
    """

    @classmethod
    def from_failure(cls, path: object, err: BaseException) -> "WriteError":
        """A one-line message naming the file, the reason and the free space left there."""
        import os
        import shutil

        text = str(err).strip()
        reason = getattr(err, "strerror", None) or (text.splitlines()[0][:120] if text else type(err).__name__)
        if "unexpected pos" in text:  # torch.save's report of a short write
            reason = "the write was cut short"
        try:
            free = f"{shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2**20:.0f} MiB free there"
        except OSError:
            free = "free space unknown"
        error = cls(f"cannot write {path} ({reason}; {free}); free disk space (or raise the quota or file-size "
                    "limit), then run the same command again (resume where it applies)")
        error.errno = getattr(err, "errno", None)
        return error
