"""Errors of the Spark layer: bad input data, and a failed Spark task turned into the one
line a user needs."""

#: Bad records quoted per error message.
MAX_EXAMPLES = 3


class DataError(ValueError):
    """Input data that cannot be used, with a message for the user."""


def python_cause(err):
    """``"a Spark task failed: <ExceptionType>: <message>"`` for a Py4J/Spark error that
    wraps a Python exception raised in a task, else None."""
    text = str(err)
    if "Traceback" not in text and "PythonException" not in text:
        return None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.split(":", 1)[0].endswith(("Error", "Exception")) and not line.startswith("at "):
            return f"a Spark task failed: {line}"
    return None
