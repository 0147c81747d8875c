"""moka-generate refuses bad input with exit status 2 and the library's message (the checks live
in the library functions the command calls, so Python callers get them too). One row a case."""

import re

import pytest

from moka_jax.cli import generate as cli

# (arguments, the message on stderr)
CASES = [
    (["--model", "random", "--prompt", "hi", "--max-new-tokens", "2100"],
     r"error: generate: \d+ positions exceed the model's max_position_embeddings = 2048; the "
     r"longest prompt has \d+ tokens and max_new_tokens is 2100: lower max_new_tokens to at "
     r"most \d+"),
    (["--model", "random", "--prompt", "hi", "--max-new-tokens", "0"],
     r"--max-new-tokens: .*expected >= 1"),
]


def exit_status(argv) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:  # argparse's own refusals
        return e.code


@pytest.mark.parametrize("argv,message", CASES, ids=[str(i) for i in range(len(CASES))])
def test_bad_generation_input_exits_2_with_the_message(argv, message, capsys):
    assert exit_status(argv) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
