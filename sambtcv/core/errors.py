"""The package's one error type: a problem with a value the user gave, said in one sentence.

The package knows no command-line flags. Where a message is about a value that came from somewhere
the caller knows better (a flag, a field of a request), it names that value with ``{subject}``; the
library fills in a plain noun (``subject="the margin"``) and a page that parsed the value replaces it
with the flag's name (`sambtcv.cli.flag`), so the same check reads "--margin-mm must be ..." on the
command line and "margin must be ..." in the viewer's HTTP API.
"""
from __future__ import annotations


class PipelineError(Exception):
    """A user-facing problem: one sentence. Pages print it as ``error: ...`` and exit with status 2.

    `message` may hold ``{subject}`` (once or more); it is rendered with `subject`.
    """

    def __init__(self, message: str, subject: str | None = None):
        super().__init__(message)
        self.template = message
        self.subject = subject

    def __str__(self) -> str:
        if self.subject is None or "{subject}" not in self.template:
            return self.template
        return self.template.replace("{subject}", self.subject)

    def about(self, subject: str) -> "PipelineError":
        """The same problem said of `subject` (a flag's name, a request field) when the message names one."""
        if "{subject}" not in self.template:
            return self
        err = PipelineError(self.template, subject)
        err.__cause__ = self.__cause__
        return err
