"""fedmoe's Flower ServerApp and ClientApp.

Both read the run from Flower's run config: ``fedmoe-config`` (the resolved fedmoe config as YAML),
``run-dir`` (where the server writes the run directory, on the server machine) and ``resume``.
A ClientApp reads its own SuperNode's node config: ``partition-id`` (which client it is),
``data-path`` (its own data file; without it, its partition of the config's ``data.source``),
``state-dir`` (where its private state lives) and ``worker`` (the Unix socket of a ``fedmoe worker``
on this machine: the ClientApp then only relays each message to it, :mod:`.relay`).

Message types: ``query`` (which client are you; run your one-shot setup once per run), ``train``,
``evaluate`` (your own model on your test data) and ``evaluate.global`` (the global model on your
test data).
"""

from __future__ import annotations

from .relay import relay, worker_socket

# the ClientApp of a process without a worker (a simulation actor; a SuperNode's per-message process)
# keeps the run's model and every client it served while the process lives
_CACHE = None


def _config(options):
    import yaml

    from ...config import config_from_tree

    return config_from_tree(yaml.safe_load(options["fedmoe-config"]), "the Flower run config 'fedmoe-config'")


def server_main(grid, context, options=None) -> None:
    """The ServerApp: the federation loop of :mod:`fedmoe.federation.runtime` over a FlowerTransport."""
    from ...rundir import RunDir
    from ..directories import open_run_dir
    from ..runtime import Federation
    from .server import FlowerTransport

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
    """The ClientApp: this SuperNode's client answers one message, here or (node config ``worker``)
    through the fedmoe worker beside the SuperNode, which keeps the model loaded. The relay path
    imports no torch."""
    global _CACHE
    from flwr.app import Message as FlowerMessage

    opts = dict(options or context.run_config)
    kind, node = message.metadata.message_type, context.node_config
    path = worker_socket(node)
    if path is not None:
        return FlowerMessage(relay(path, kind, message.content, opts, node), reply_to=message)
    if _CACHE is None:
        from .client import ClientCache

        _CACHE = ClientCache()
    return FlowerMessage(_CACHE.reply(kind, message.content, opts, node), reply_to=message)


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
