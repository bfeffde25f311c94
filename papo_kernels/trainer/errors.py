"""The one exception type for trainer input the user must fix; ``papo-train`` prints it as one line."""


class TrainerInputError(ValueError):
    """A config field, input file or resume request the trainer cannot use.

    The message names the field, file or flag, what came and what is allowed. It is a
    ``ValueError``, so code that catches bad values keeps working; ``papo-train`` turns
    exactly this type (not every ``ValueError``) into ``papo-train: error: ...``, so a bug
    elsewhere still shows its traceback.
    """


class TrainerWarning(UserWarning):
    """Something the trainer set right on its own and reports once (an incomplete last metrics record, dropped);
    ``papo-train`` prints it as one line, ``papo-train: warning: ...``."""
