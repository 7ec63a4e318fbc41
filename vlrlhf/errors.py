"""Errors about bad input that carry a short `reason`, the key of skip counts and quarantine lines."""


class ReasonError(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
