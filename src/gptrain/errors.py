"""UserError: a mistake the user can fix; the CLI prints it as one line and exits with code 2."""


class UserError(Exception):
    """Bad input (file, flag, config, corpus). The message says what is wrong and what to do.

    is_echo: the same error that rank 0 already reports (other ranks exit quietly with it).
    """

    def __init__(self, message: str, *, is_echo: bool = False) -> None:
        super().__init__(message)
        self.is_echo = is_echo
