"""UserError: a mistake the user can fix; the CLI prints it as one line and exits with code 2."""


class UserError(Exception):
    """Bad input (file, flag, config, corpus). The message says what is wrong and what to do."""
