"""Turning a failed Spark task into the one line a user needs."""


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
