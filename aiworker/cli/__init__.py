# ruff: noqa: I001  (the import order below is the order of `aiworker --help`)
"""The ``aiworker`` command line: serve, echo, send, status, select, infer, retry, resend,
purge, phantom, train-demo, demo.

Every command but ``phantom`` and ``demo`` takes ``--config FILE`` (default: the
``AIWORKER_CONFIG`` variable, else ``config/aiworker.yaml``), so ``docker exec ... aiworker
status`` reads the server's file. A bad config stops the command with one line per problem and exit
code 2.

One module per kind of command (:mod:`~aiworker.cli.node`, :mod:`~aiworker.cli.state`,
:mod:`~aiworker.cli.selection`, :mod:`~aiworker.cli.tools`), each registering its commands
on the one app of :mod:`~aiworker.cli.common`.
"""

from aiworker.cli.common import app

# each module registers its commands on app, in this order
from aiworker.cli import node, state, selection, tools  # noqa: F401
from aiworker.cli import export  # noqa: F401,E402  (aiworker export)

__all__ = ["app"]
