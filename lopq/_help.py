"""``--help`` texts of the command-line programs, from their module docstrings."""

import argparse


def help_texts(docstring, example):
    """Keyword arguments for `argparse.ArgumentParser`: the docstring's first paragraph
    as the description (whole sentences, however the source wraps them) and an epilog
    with one ``example`` command line that runs as written.

    Args:
        docstring: the program's module docstring.
        example: the example command (one line).
    """
    paragraph = []
    for line in docstring.strip().splitlines():
        if not line.strip():
            break
        paragraph.append(line.strip())
    return {"description": " ".join(paragraph),
            "epilog": f"example (from the repository root, after `make demo`):\n  {example}",
            "formatter_class": argparse.RawDescriptionHelpFormatter}
