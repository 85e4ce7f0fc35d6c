"""The tritonserver of a run: one launcher for the two stages that start one, the triton
stage on the export (`stack.py`) and the winner stage on the tuned model (`winner.py`),
which is why it sits below both rather than in the command that orders them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bench.gpu.run import Stack


def triton_server(stack: Stack, repository: Path, config_name: str, log_path: Path) -> Any:
    """A tritonserver on `repository`: the kit's binary when a kit was installed, with the
    run's library path; else this environment's, as `embedded/tritonserver.py` starts it."""
    from embedded.processes import start_group
    from embedded.tritonserver import TritonServer

    server = stack.server
    env = stack.env.apply(os.environ)

    class KitTritonServer(TritonServer):
        def command(self) -> list[str]:
            command = super().command()
            if server is not None:
                command[0] = str(server.binary)
            return command

        def start(self) -> KitTritonServer:
            if self.process is None or self.process.poll() is not None:
                self.process = start_group(self.command(), env=env, log_path=self.log_path)
            return self

    if server is None:  # the wheel in this environment, with its own library path
        from embedded.tritonserver import server_environment

        env = stack.env.apply(server_environment())
    return KitTritonServer(
        repository, log_path=log_path, config_name=config_name, backend_directory=stack.backend_directory
    )
