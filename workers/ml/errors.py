"""Errors raised by the training library that describe something the user can fix."""

from __future__ import annotations


class TrainingDataError(ValueError):
    """A user error in the training data: fails once, never retried."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code = code
        """A stable machine-readable code, e.g. ``"empty_training_file"`` (OpenAI error style)."""
        self.message = message
        """A sentence the user reads and can act on."""
        self.param = param
        """The hyperparameter or input the error is about, when there is one."""

    def to_dict(self) -> dict[str, str | None]:
        return {"code": self.code, "message": self.message, "param": self.param}

    def __repr__(self) -> str:
        return f"TrainingDataError(code={self.code!r}, message={self.message!r}, param={self.param!r})"
