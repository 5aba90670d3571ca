"""A real Flower deployment on this machine: a SuperLink and one SuperNode per client, each its own
process group on 127.0.0.1 with free ports, and a ``$FLWR_HOME`` that names the SuperLink. For
tests and benchmarks, and to try a deployment before spreading it over machines::

    with LocalDeployment(Path("/tmp/lab"), clients=2) as lab:
        lab.run(["data.partition.num_clients=2", ...]).wait()
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
FEDERATION = "local"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalDeployment:
    def __init__(self, root: Path, clients: int = 2, data_paths: dict[int, Path] | None = None,
                 threads: int | None = None, workers: bool | dict[int, int] = False, shared_workers: int | None = None,
                 database: bool = False, node_config: dict[int, str] | None = None):
        """``threads``: torch threads of every client process (OMP_NUM_THREADS); ``data_paths``: a
        client's own data file (the others take their partition of the config's source); ``workers``:
        each SuperNode (True) or those named ({client: ranks}) relays to a ``fedmoe worker`` with that
        many ranks on ``ROOT/worker-N.sock`` (started by its first message; :meth:`stop` stops them too);
        ``shared_workers`` = k: client i relays to worker ``i mod k`` instead (a lab machine too small for a
        worker per SuperNode: each worker keeps one model and serves its SuperNodes one message at a time);
        ``database``: the SuperLink keeps its state in ``ROOT/superlink.db``, so a restarted SuperLink knows its
        SuperNodes (which then stay up) and marks the run it lost as failed (about 3 s more per round here);
        ``node_config``: more of a SuperNode's node config, by client (e.g. its privacy budget, ``dp-epsilon=8``)."""
        self.root, self.procs, self.state, self.cmds = Path(root), {}, {}, {}
        self.sockets: dict[int, Path] = {}
        self.home = self.root / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        port = free_port()
        (self.home / "config.toml").write_text(f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n'
                                               f'address = "127.0.0.1:{port}"\ninsecure = true\n')
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "FLWR_TELEMETRY_ENABLED": "0",
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        if threads is not None:
            self.env["OMP_NUM_THREADS"] = str(threads)
        if clients <= 8:  # a SuperExec looks for a message to run every 0.1 s, not 1 s (with 40 on one machine
            # their polling alone kept two cores busy)
            self.env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
        # the SuperLink keeps its state (nodes, runs, messages) in a database file, so a restarted one knows
        # its SuperNodes (without it, a restart makes every SuperNode's heartbeat a 401 and it exits)
        self._start("superlink", [BIN / "flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
                                  "--port", str(port)]
                    + (["--database", str(self.root.resolve() / "superlink.db")] if database else []))
        for i in range(clients):
            self.state[i] = self.root / f"state-{i}"
            own = f' data-path="{data_paths[i]}"' if data_paths and i in data_paths else ""
            own += f" {node_config[i]}" if node_config and i in node_config else ""
            ranks = (1 if workers is True else 0) if not isinstance(workers, dict) else workers.get(i, 0)
            if ranks:
                self.sockets[i] = self.root.resolve() / f"worker-{i if shared_workers is None else i % shared_workers}.sock"
                own += f' worker="{self.sockets[i]}" worker-nproc={ranks}'
            self._start(f"node{i}", [BIN / "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                                     "--port", str(free_port()), "--node-config",
                                     f'partition-id={i} state-dir="{self.state[i]}"{own}'])

    def _start(self, name: str, cmd) -> None:
        self.cmds[name] = cmd
        with open(self.root / f"{name}.log", "a") as log:
            self.procs[name] = subprocess.Popen([str(c) for c in cmd], cwd=self.root, env=self.env, stdout=log,
                                                stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self, name: str) -> None:
        """Kill a process and everything it started (its process group)."""
        p = self.procs.pop(name)
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()

    def restart(self, name: str) -> None:
        """Start a killed process again with its command (a SuperNode comes back with a new node id,
        the same client id and state directory)."""
        self._start(name, self.cmds[name])

    def stop(self) -> None:
        from .relay import kill_worker

        for name in list(self.procs):
            self.kill(name)
        for path in set(self.sockets.values()):
            kill_worker(path)

    def run(self, sets: list[str], config: str | None = None) -> subprocess.Popen:
        """``fedmoe run [config] --runtime flower`` on this deployment (stdout and stderr piped)."""
        cmd = [sys.executable, "-m", "fedmoe.cli", "run", *([config] if config else []), "--runtime", "flower",
               "--federation", FEDERATION, "--quiet", *[x for s in sets for x in ("--set", s)]]
        return subprocess.Popen(cmd, cwd=self.root, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
