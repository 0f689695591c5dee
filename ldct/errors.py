"""The one base class of every error ldct shows to a user.

A user-facing error is a subclass of :class:`LdctError` *and* of the builtin it always was
(``ValueError``, ``RuntimeError``...), so ``except ValueError`` written against older versions
still catches it. The CLIs print an ``LdctError`` as one line (its message names the file, key
or value and what to do) and keep the traceback for anything else, which is a bug.
"""

from __future__ import annotations


class LdctError(Exception):
    """Base of every error whose message is meant for the user (one line, says what to do)."""


class TrainingError(LdctError, RuntimeError):
    """A training run, or the study around it, cannot go on; the message says why and where.

    Defined here, not in ``ldct.training``, because the storage checks of ``ldct.cluster`` (below
    training) raise it too.
    """
