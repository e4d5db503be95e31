"""``python -m aiworker.cli``: the ``aiworker`` command."""

from aiworker.cli import app

app()
