"""BentoML's process manager (circus) without TCP control ports.

circus is driven over two ZeroMQ endpoints: a controller that takes commands (list, stop, start,
signal, ... with no authentication) and an event stream. BentoML 1.4 binds both to TCP ports on
127.0.0.1 (`bentoml._internal.utils.circus.create_standalone_arbiter`), where any local user can
send commands. circus accepts `ipc://` endpoints (unix sockets), so the arbiter BentoML builds is
given two sockets in a fresh 0700 directory instead (removed when the arbiter stops); BentoML's
own internal service sockets are unix sockets in its 0700 `bentoml-uds-*` directory already.

BentoML has no setting for these endpoints: `install_private_endpoints` makes the arbiter class
it instantiates (looked up when `bentoml serve` builds the arbiter, after it has imported our
service module) a subclass whose only change is the two endpoints.
"""
from __future__ import annotations

import shutil
import tempfile

_INSTALLED = "_clipheads_private_endpoints"


def install_private_endpoints() -> None:
    from bentoml._internal.utils import circus as bentoml_circus

    base = bentoml_circus.Arbiter
    if getattr(base, _INSTALLED, False):
        return

    class PrivateEndpointArbiter(base):  # type: ignore[misc, valid-type]
        """BentoML's arbiter with its controller and event endpoints on unix sockets in a 0700 dir."""

        def __init__(self, watchers, *args, **kwargs):
            folder = tempfile.mkdtemp(prefix="clipheads-circus-")  # 0700, owned by the server's user
            kwargs.update(endpoint=f"ipc://{folder}/control", pubsub_endpoint=f"ipc://{folder}/events")
            super().__init__(watchers, *args, **kwargs)
            self.private_dir = folder
            self.exit_stack.callback(shutil.rmtree, folder, ignore_errors=True)

    setattr(PrivateEndpointArbiter, _INSTALLED, True)
    bentoml_circus.Arbiter = PrivateEndpointArbiter
