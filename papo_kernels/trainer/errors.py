"""The exception types ``papo-train`` prints as one line: input the user must fix, output it cannot write."""


class TrainerInputError(ValueError):
    """A config field, input file or resume request the trainer cannot use.

    The message names the field, file or flag, what came and what is allowed. It is a
    ``ValueError``, so code that catches bad values keeps working; ``papo-train`` turns
    exactly this type (not every ``ValueError``) into ``papo-train: error: ...``, so a bug
    elsewhere still shows its traceback.
    """


class TrainerOutputError(OSError):
    """An output file the trainer could not write (a full disk, a file size limit, a failed or short write).

    The message names the file and the error number, and says what was kept; ``papo-train``
    prints it as one line, ``papo-train: error: ...``. It is an ``OSError`` with the failed
    write's ``errno`` (None for a short write, which sets none).
    """

    def __init__(self, message: str, errno=None):
        super().__init__(message)
        self.errno = errno

    def __str__(self) -> str:
        return self.args[0]


class TrainerWarning(UserWarning):
    """Something the trainer set right on its own and reports once (an incomplete last metrics record, dropped);
    ``papo-train`` prints it as one line, ``papo-train: warning: ...``."""
