"""What the commands count as a user's input error (exit status 2) rather than a bug."""

from __future__ import annotations


def user_errors() -> tuple:
    """Errors that mean "the input is wrong" (exit status 2), as opposed to bugs."""
    from moka_jax.config import ConfigError
    from moka_jax.data.records import DataError
    from moka_jax.io.attach import AdapterMismatch
    from moka_jax.support.files import FileCheckError
    from moka_jax.support.outputs import OutputError
    from moka_jax.support.trees import CheckpointError

    return (ConfigError, DataError, FileCheckError, CheckpointError, OutputError,
            AdapterMismatch)


__all__ = ["user_errors"]
