"""The one exception type for mistakes a user can fix."""


class DRGSInputError(ValueError):
    """Bad input: the message names the file/field, what was found, what was expected and what to do."""

    def __init__(self, what: str, found: str = "", expected: str = "", fix: str = ""):
        parts = [what]
        if found:
            parts.append(f"found: {found}")
        if expected:
            parts.append(f"expected: {expected}")
        if fix:
            parts.append(f"what to do: {fix}")
        super().__init__(". ".join(parts))
        self.what, self.found, self.expected, self.fix = what, found, expected, fix
