"""Shared by the trainer tests of bad input: small CLI flags and the check of ``papo-train``'s one-line errors."""

import pytest

from papo_kernels.train import main

SMALL_FLAGS = ["--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "3", "--num-threads", "1",
               "--eval-every", "0"]


def cli_error(capsys, argv) -> str:
    """Run ``papo-train argv``; expect exit status 2 and one line ``papo-train: error: ...`` on stderr, with no
    traceback; return the message after ``error: ``."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.count("papo-train: error: ") == 1 and "Traceback" not in err, err
    message = err.split("papo-train: error: ")[1]
    assert message.endswith("\n") and "\n" not in message[:-1], f"not one line: {message!r}"
    return message[:-1]
