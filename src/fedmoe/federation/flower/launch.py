"""Starting a fedmoe run on Flower: its simulation engine (``flower-sim``), or a SuperLink with
SuperNodes on other machines (``flower``, through ``flwr run``)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import yaml

from ...config import ConfigError, RunConfig, config_to_dict
from ...rundir import FLOWER_RUN, RunDir, resume_command, shell_quote


class FlowerMissing(ConfigError):
    pass


def require_flower() -> None:
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise FlowerMissing("the Flower runtimes need Flower: pip install -e '.[flower]' (or: pip install "
                            "'flwr[simulation]==1.42.0')") from None


def absolute_local_paths(cfg: RunConfig, log=print) -> RunConfig:
    """``cfg`` with each relative path that names a file or folder here (``model.name``, ``model.tokenizer``, each
    ``data.source``, with ``data.field_maps`` renamed after them) made absolute. A deployment's ServerApp runs in
    the SuperLink's working directory (and a SuperNode reads ``data.source`` in its own): a path checked here
    relative to this one was opened relative to that one — not found, or another file of the same name, or read as
    a hub id. Values that name nothing here (hub ids, ``dolly``, ``builtin:``) are left as they are."""
    from ...config import config_from_tree

    tree = config_to_dict(cfg)
    made: list[str] = []

    def absolute(key: str, value):
        if not isinstance(value, str) or value.startswith("builtin:"):
            return value
        path = Path(value).expanduser()
        if path.is_absolute() or not path.exists():
            return value
        made.append(f"{key} = {value} -> {path.resolve()}")
        return str(path.resolve())

    model, data = tree["model"], tree["data"]
    model["name"] = absolute("model.name", model["name"])
    model["tokenizer"] = absolute("model.tokenizer", model.get("tokenizer"))
    sources = data["source"] if isinstance(data["source"], list) else [data["source"]]
    renamed = {src: absolute("data.source", src) for src in sources}
    data["source"] = [renamed[s] for s in sources] if isinstance(data["source"], list) else renamed[sources[0]]
    data["field_maps"] = {renamed.get(src, src): fm for src, fm in (data.get("field_maps") or {}).items()}
    if not made:
        return cfg
    log("paths made absolute for the SuperLink's ServerApp and the SuperNodes (which run in other directories): "
        + "; ".join(made))
    return config_from_tree(tree, "the run config with absolute paths")


def run_options(cfg: RunConfig, rd: RunDir, resume: bool) -> dict:
    return {"fedmoe-config": yaml.safe_dump(config_to_dict(cfg), sort_keys=False),
            "run-dir": str(Path(rd.path).resolve()), "resume": bool(resume)}


def _finished(rd: RunDir, what: str) -> dict | None:
    """The summary when the run finished; None when it stopped at a checkpoint (kept); else an error."""
    if rd.summary_path.is_file():
        return rd.read_summary()
    if (rd.checkpoint_dir / "state.pt").is_file():
        raise RuntimeError(f"the {what} ended before the run finished; its last checkpoint is in {rd.checkpoint_dir}: "
                           f"see the log above, then continue with `{resume_command(rd.path)}`")
    raise RuntimeError(f"the {what} ended without a checkpoint; see the log above")


class _NotForTheUser:
    """A logging filter: Flower's notice that ``run_simulation`` is deprecated speaks to fedmoe's code, not to the
    person who ran ``fedmoe run --runtime flower-sim`` (who has nothing to change); every other record passes."""

    def filter(self, record) -> bool:
        return "The `run_simulation` function is deprecated" not in record.getMessage()


def _developer_notices_off() -> None:
    """Flower's deprecation of ``run_simulation`` (flwr is pinned at 1.42.0, where it still works; the way on is
    ``flwr run`` against a SuperLink in simulation mode) and Ray's tip that a future Ray will stop hiding the GPUs
    from a client that reserves none (fedmoe reserves them explicitly, ``federation.simulation.client_gpus``):
    both address fedmoe's code, and only they are silenced."""
    import logging
    import warnings

    flower = logging.getLogger("flwr")
    if not any(isinstance(f, _NotForTheUser) for f in flower.filters):
        flower.addFilter(_NotForTheUser())
    warnings.filterwarnings("ignore", message="Tip: In future versions of Ray, Ray will no longer override",
                            category=FutureWarning)


def simulation_resources(cfg: RunConfig, cpus: int | None = None, gpus: int | None = None) -> dict:
    """Ray's ``client_resources`` for each simulated client (``federation.simulation``), checked against this
    machine's ``cpus`` and CUDA ``gpus`` (default: counted here) before Ray starts: a reservation no client
    fits would leave Flower's actor pool empty, and a GPU Ray hides or renumbers would fail in every client."""
    import torch

    cpus = (os.cpu_count() or 1) if cpus is None else cpus
    gpus = torch.cuda.device_count() if gpus is None else gpus
    sim, device = cfg.federation.simulation, cfg.model.device
    key = "federation.simulation.client_gpus"
    if sim.client_cpus > cpus:
        raise ConfigError(f"federation.simulation.client_cpus = {sim.client_cpus}, but this machine has {cpus} CPUs: "
                          f"no simulated client would fit; set it to at most {cpus}")
    if device.startswith("cuda") and gpus == 0:
        raise ConfigError(f"model.device = {device}, but this machine has no CUDA device: use auto or cpu")
    share = sim.gpu_share(device.startswith("cuda") or (device == "auto" and gpus > 0))
    if share > 0 and gpus == 0:
        raise ConfigError(f"{key} = {share:g}, but this machine has no CUDA device: set it to 0 (or leave it null) for "
                          "clients on the CPU")
    if share > 0 and device.startswith("cpu"):
        raise ConfigError(f"{key} = {share:g} reserves a GPU for each client, but model.device is cpu: set "
                          f"{key}: 0, or model.device: auto")
    if share > 0 and ":" in device:
        raise ConfigError(f"model.device = {device}: Ray gives each simulated client its own GPU, which it sees as "
                          f"cuda:0; set model.device: cuda (or auto), and {key} to the share of a GPU a client takes")
    if share == 0 and device.startswith("cuda"):
        raise ConfigError(f"model.device = {device}, but {key} = 0: Ray hides the GPUs from clients that reserve none; "
                          f"set {key} to the share of a GPU each client takes (1: one client per GPU at a time)")
    return {"num_cpus": sim.client_cpus, "num_gpus": share}


def run_simulation(cfg: RunConfig, rd: RunDir, resume: bool = False, log=print) -> dict:
    """The run on Flower's simulation engine (Ray): one virtual SuperNode per client, each client's
    private state in the run directory's ``clients/``; each client reserves ``federation.simulation``'s
    CPUs and share of a GPU (:func:`simulation_resources`), so Ray runs as many at once as fit."""
    require_flower()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    resources = simulation_resources(cfg)
    from flwr.simulation import run_simulation as flower_run_simulation

    from .apps import make_apps

    options = {**run_options(cfg, rd, resume), "state-root": str(Path(rd.path).resolve() / "clients")}
    server_app, client_app = make_apps(options)
    _developer_notices_off()
    log(f"Flower simulation: each client reserves {resources['num_cpus']} CPU(s)"
        + (f" and {resources['num_gpus']:g} of a GPU" if resources["num_gpus"] else " and no GPU (it trains on the CPU)"))
    import signal
    import threading

    from .server import STOPPED

    # Ray's driver installs a C++ failure handler that aborts the process on SIGTERM (exit 134, no word of the
    # checkpoint) and a Python one that raises SystemExit(15) in place of fedmoe's; the first is turned off, the
    # second's exit is read as the SIGTERM it is, and fedmoe's handler comes back afterwards
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if main else None
    STOPPED.clear()
    try:
        with _ray_shutdown_deferred_on_a_signal():
            flower_run_simulation(server_app=server_app, client_app=client_app,
                                  num_supernodes=cfg.data.partition.num_clients,
                                  backend_config={"client_resources": resources})
    except KeyboardInterrupt:
        STUCK_THREADS["now"] = True
        raise
    except SystemExit as e:
        if e.code != signal.SIGTERM:
            raise
        STUCK_THREADS["now"] = True
        raise Terminated("SIGTERM") from None
    finally:
        STOPPED.set()  # the ServerApp's thread stops waiting on an engine that is gone (Ctrl-C, SIGTERM)
        if main and handler is not None:
            signal.signal(signal.SIGTERM, handler)
    return _finished(rd, "Flower simulation")


@contextmanager
def _ray_shutdown_deferred_on_a_signal():
    """Flower's engine shuts Ray down in a ``finally`` as a signal's exception passes through it (Ctrl-C, or SIGTERM
    as Ray's ``SystemExit``) while its worker threads may still wait on the clients' actors. A thread that lets go of
    a task's result after the shutdown calls into the shut-down Ray core, which ends the process at once with status
    1, before fedmoe says that the run stopped and where to resume (seen under load: SIGTERM gave 1, not 143). While
    a signal stops the simulation, Ray is left running (:data:`STUCK_THREADS`) and :func:`finish_stopping` ends its
    processes as this one ends. A run that ends otherwise shuts Ray down as before."""
    import ray

    real = ray.shutdown

    def shutdown(*args, **kwargs):
        if isinstance(sys.exc_info()[1], (KeyboardInterrupt, SystemExit)):
            STUCK_THREADS["now"] = True
            STUCK_THREADS["ray"] = lambda: real(*args, **kwargs)
            return None
        return real(*args, **kwargs)

    ray.shutdown = shutdown
    try:
        yield
    finally:
        ray.shutdown = real


def _descendants(pid: int) -> list[int] | None:
    """The processes ``pid`` started and theirs (from /proc), or None where there is no /proc."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    for d in entries:
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(d))
            except (OSError, IndexError, ValueError):
                continue
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def finish_stopping() -> None:
    """As the process ends after a signal stopped its simulation: end the Ray processes it left running
    (:func:`_ray_shutdown_deferred_on_a_signal`; its node's daemons, the dashboard's agent among them, do not all end
    with this process). They are this process's descendants and are killed, without a call into Ray, which the
    engine's threads may still be waiting on; without /proc (not Linux), Ray's own shutdown."""
    import signal

    owed = STUCK_THREADS.pop("ray", None)
    if owed is None:
        return
    pids = _descendants(os.getpid())
    if pids is None:
        try:
            owed()
        except Exception:  # noqa: BLE001 - the process is ending; what was to be said is said
            pass
        return
    for pid in pids:  # every one found before any is killed: a killed parent's children would move to init
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


# set when a signal stopped Flower's simulation: its engine's worker threads may wait forever on Ray actors it has
# shut down (a ray.get with no timeout), and Python's exit joins them; the command line then ends the process itself
# (:func:`fedmoe.cli` after saying what was stopped), the checkpoint and the run's lock being as they should
STUCK_THREADS = {"now": False}


class Terminated(KeyboardInterrupt):
    """A signal stopped the run (``signal``: its name), raised where the signal's own handler could not be fedmoe's
    (Ray's replaced it): the command line says what was stopped, as after Ctrl-C, with the signal's exit status."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal = signal_name


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




def _flwr() -> str:
    return shutil.which("flwr") or str(Path(sys.executable).with_name("flwr"))


def _env() -> dict:
    return {**os.environ, "FLWR_TELEMETRY_ENABLED": os.environ.get("FLWR_TELEMETRY_ENABLED", "0")}


def flower_run_status(run_id: int, federation: str, env: dict | None = None) -> str | None:
    """The status the SuperLink gives the Flower run ``run_id`` (``running``, ``finished:stopped``, ...), or
    None when it cannot say (unreachable, unknown run). ``env``: the environment of ``flwr`` (its FLWR_HOME)."""
    import json

    r = subprocess.run([_flwr(), "ls", federation, "--run-id", str(run_id), "--format", "json"], env=env or _env(),
                       capture_output=True, text=True, timeout=120)
    try:
        runs = json.loads(r.stdout).get("runs") or []
    except (json.JSONDecodeError, AttributeError):
        return None
    return next((str(x.get("status")) for x in runs if str(x.get("run-id")) == str(run_id)), None)


def refuse_if_alive(rd: RunDir) -> None:
    """A run directory whose Flower run still runs on its SuperLink (its ``fedmoe run`` was killed, the
    ServerApp was not) must not get a second ServerApp: refused, naming the command that stops it."""
    import json

    path = Path(rd.path) / FLOWER_RUN
    if not path.is_file():
        return
    rec = json.loads(path.read_text())
    status = flower_run_status(rec["flower_run_id"], rec["superlink"])
    if status is not None and not status.startswith("finished"):
        from ..checkpoint import RunDirError

        raise RunDirError(f"{rd.path} is still being written by Flower run {rec['flower_run_id']} on the SuperLink "
                          f"{rec['superlink']!r} (status {status}): stop it with `flwr stop {rec['flower_run_id']} "
                          f"{shell_quote(rec['superlink'])}` (or let it finish), then resume. (A SuperLink that "
                          "restarted marks the run it lost as failed within about a minute: two missed 30 s heartbeats "
                          "of its ServerApp.)")


def stop_flower_run(run_id: int, federation: str, log=print) -> None:
    r = subprocess.run([_flwr(), "stop", str(run_id), federation], env=_env(), capture_output=True, text=True,
                       timeout=120)
    if r.returncode == 0:
        log(f"stopped the Flower run {run_id} on {federation}")
    elif str(flower_run_status(run_id, federation)).startswith("finished"):  # it ended before the stop reached it
        log(f"the Flower run {run_id} on {federation} had already finished: nothing to stop")
    else:
        log(f"could not stop the Flower run {run_id} on {federation} ({(r.stderr or r.stdout).strip()[-300:]}): stop "
            f"it with `flwr stop {run_id} {shell_quote(federation)}` before resuming")


def run_deployment(cfg: RunConfig, rd: RunDir, federation: str, resume: bool = False, stream: bool = True) -> dict:
    """The run on a running SuperLink (``federation``: its name in $FLWR_HOME/config.toml) through
    ``flwr run``; the SuperNodes connect to that SuperLink on their own machines. The Flower run's id is
    kept in the run directory (:data:`FLOWER_RUN`); Ctrl-C or SIGTERM of this process stops that Flower
    run on the SuperLink (``flwr stop``), and a resume refuses while it still runs (:func:`refuse_if_alive`)."""
    import json
    import re
    import signal

    from ...rundir import atomic_write_text

    require_flower()
    refuse_if_alive(rd)
    app = write_app(rd, run_options(cfg, rd, resume))
    cmd = [_flwr(), "run", str(app), federation, "--stream"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True)  # Ctrl-C reaches this process; it stops the Flower run
    run_id = None

    def terminate(signum, frame):
        if callable(previous):  # fedmoe's own (the CLI's: it records that SIGTERM stopped the run)
            previous(signum, frame)
        raise KeyboardInterrupt

    import threading

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, terminate) if main else None
    try:
        for line in proc.stdout:
            if stream:
                sys.stdout.write(line)
                sys.stdout.flush()
            m = re.search(r"Successfully started run (\d+)", line)
            if m and run_id is None:
                run_id = int(m.group(1))
                atomic_write_text(Path(rd.path) / FLOWER_RUN,
                                  json.dumps({"flower_run_id": run_id, "superlink": federation}) + "\n")
        proc.wait()
    except KeyboardInterrupt:
        if run_id is not None:
            stop_flower_run(run_id, federation)
        proc.terminate()
        proc.wait()
        raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
    if proc.returncode != 0:
        raise RuntimeError(f"`{shlex.join(map(str, cmd))}` failed (exit {proc.returncode}); see its output above")
    return _finished(rd, "Flower run")
