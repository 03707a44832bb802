class UsageError(Exception):
    """Bad input from the user (data, model, options, output directory).

    The CLI prints the message and exits non-zero without a traceback; it is always raised before
    anything in the output directory is written.
    """
