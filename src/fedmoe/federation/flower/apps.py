"""fedmoe's Flower ServerApp and ClientApp.

Both read the run from Flower's run config: ``fedmoe-config`` (the resolved fedmoe config as YAML),
``run-dir`` (where the server writes the run directory, on the server machine) and ``resume``.
A ClientApp reads its own SuperNode's node config: ``partition-id`` (which client it is),
``data-path`` (its own data file; without it, its partition of the config's ``data.source``) and
``state-dir`` (where its private state lives).

Message types: ``query`` (which client are you; run your one-shot setup once per run), ``train``,
``evaluate`` (your own model on your test data) and ``evaluate.global`` (the global model on your
test data).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ...config import config_from_tree
from ...rundir import RunDir
from ..directories import open_run_dir
from ..runtime import Federation
from .client import ClientModel, FlowerClient
from .server import FlowerTransport

DEFAULT_STATE_DIR = Path.home() / ".fedmoe" / "client-state"
# while a process lives (a simulation actor) it keeps the run's model and every client it served
_MODEL: dict[str, ClientModel] = {}
_CLIENTS: dict[tuple, FlowerClient] = {}


def _config(options):
    return config_from_tree(yaml.safe_load(options["fedmoe-config"]), "the Flower run config 'fedmoe-config'")


def server_main(grid, context, options=None) -> None:
    """The ServerApp: the federation loop of :mod:`fedmoe.federation.runtime` over a FlowerTransport."""
    opts = dict(options or context.run_config)
    transport = FlowerTransport(grid, _config(opts))
    if opts.get("resume"):
        cfg, rd, ck = open_run_dir(opts["run-dir"])
        transport.cfg = cfg
        Federation(cfg, rd, transport=transport, resuming=True).resume(ck)
    else:
        cfg = _config(opts)
        Federation(cfg, RunDir(opts["run-dir"]), transport=transport).run()


def client_reply(message, context, options=None):
    """The ClientApp: this SuperNode's client answers one message."""
    from flwr.app import Message as FlowerMessage

    opts = dict(options or context.run_config)
    node = context.node_config
    if "partition-id" not in node:
        raise ValueError("this SuperNode has no partition-id in its node config: start it with "
                         "--node-config 'partition-id=N' (N = its client id, 0..num_clients-1)")
    state_dir = node.get("state-dir") or opts.get("state-root") or str(DEFAULT_STATE_DIR)
    text = opts["fedmoe-config"]
    key = (text, int(node["partition-id"]), node.get("data-path"), str(state_dir))
    if key not in _CLIENTS:
        model_s = 0.0
        if text not in _MODEL:  # another run in this process: its model and clients are not needed any more
            _MODEL.clear()
            _CLIENTS.clear()
            _MODEL[text] = ClientModel(_config(opts))
            model_s = _MODEL[text].load_s
        client = FlowerClient(_MODEL[text], int(node["partition-id"]), node.get("data-path"), Path(state_dir))
        client.load_s += model_s
        _CLIENTS[key] = client
    content = _CLIENTS[key].handle(message.metadata.message_type, message.content)
    return FlowerMessage(content, reply_to=message)


def make_apps(options: dict | None = None):
    """(ServerApp, ClientApp); ``options`` None: read from Flower's run config (deployment)."""
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    server_app, client_app = ServerApp(), ClientApp()

    @server_app.main()
    def _main(grid, context):
        server_main(grid, context, options)

    @client_app.query()
    def _query(message, context):
        return client_reply(message, context, options)

    @client_app.train()
    def _train(message, context):
        return client_reply(message, context, options)

    @client_app.evaluate()
    def _evaluate(message, context):
        return client_reply(message, context, options)

    @client_app.evaluate("global")
    def _evaluate_global(message, context):
        return client_reply(message, context, options)

    return server_app, client_app


def _deployment_apps():
    try:
        return make_apps()
    except ImportError:  # flwr not installed: the module stays importable
        return None, None


server_app, client_app = _deployment_apps()
