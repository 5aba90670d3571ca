"""Starting a fedmoe run on Flower: its simulation engine (``flower-sim``), or a SuperLink with
SuperNodes on other machines (``flower``, through ``flwr run``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from ...config import ConfigError, RunConfig, config_to_dict
from ...rundir import RunDir


class FlowerMissing(ConfigError):
    pass


def require_flower() -> None:
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise FlowerMissing("the Flower runtimes need Flower: pip install -e '.[flower]' (or: pip install "
                            "'flwr[simulation]==1.42.0')") from None


def run_options(cfg: RunConfig, rd: RunDir, resume: bool) -> dict:
    return {"fedmoe-config": yaml.safe_dump(config_to_dict(cfg), sort_keys=False),
            "run-dir": str(Path(rd.path).resolve()), "resume": bool(resume)}


def _finished(rd: RunDir, what: str) -> dict | None:
    """The summary when the run finished; None when it stopped at a checkpoint (kept); else an error."""
    if rd.summary_path.is_file():
        return rd.read_summary()
    if (rd.checkpoint_dir / "state.pt").is_file():
        raise RuntimeError(f"the {what} ended before the run finished; its last checkpoint is in {rd.checkpoint_dir}: "
                           f"see the log above, then continue with `fedmoe run --resume {rd.path}`")
    raise RuntimeError(f"the {what} ended without a checkpoint; see the log above")


def run_simulation(cfg: RunConfig, rd: RunDir, resume: bool = False) -> dict:
    """The run on Flower's simulation engine (Ray): one virtual SuperNode per client, each client's
    private state in the run directory's ``clients/``."""
    require_flower()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from flwr.simulation import run_simulation as flower_run_simulation

    from .apps import make_apps

    options = {**run_options(cfg, rd, resume), "state-root": str(Path(rd.path).resolve() / "clients")}
    server_app, client_app = make_apps(options)
    flower_run_simulation(server_app=server_app, client_app=client_app,
                          num_supernodes=cfg.data.partition.num_clients,
                          backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    return _finished(rd, "Flower simulation")


def app_pyproject(options: dict) -> dict:
    return {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "fedmoe-run", "version": "1.0.0", "license": "Apache-2.0", "dependencies": [],
                    "description": "A fedmoe run (written by `fedmoe run --runtime flower`)"},
        "tool": {"flwr": {"app": {"publisher": "fedmoe",
                                  "components": {"serverapp": "fedmoe_app:server_app", "clientapp": "fedmoe_app:client_app"},
                                  "config": options}}},
    }


APP_MODULE = '''"""The fedmoe Flower app (fedmoe must be installed where it runs)."""
from fedmoe.federation.flower import apps as _apps

server_app = _apps.server_app
client_app = _apps.client_app
'''


def write_app(rd: RunDir, options: dict) -> Path:
    """A Flower app folder for this run: the ServerApp and ClientApp of fedmoe, and the run config."""
    import tomli_w

    app = Path(rd.path) / "flower-app"
    app.mkdir(parents=True, exist_ok=True)
    (app / "pyproject.toml").write_text(tomli_w.dumps(app_pyproject(options)))
    (app / "fedmoe_app.py").write_text(APP_MODULE)
    return app


def run_deployment(cfg: RunConfig, rd: RunDir, federation: str, resume: bool = False, stream: bool = True) -> dict:
    """The run on a running SuperLink (``federation``: its name in $FLWR_HOME/config.toml) through
    ``flwr run``; the SuperNodes connect to that SuperLink on their own machines."""
    require_flower()
    app = write_app(rd, run_options(cfg, rd, resume))
    flwr = shutil.which("flwr") or str(Path(sys.executable).with_name("flwr"))
    cmd = [flwr, "run", str(app), federation] + (["--stream"] if stream else [])
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": os.environ.get("FLWR_TELEMETRY_ENABLED", "0")}
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}); see its output above")
    return _finished(rd, "Flower run")
