"""fedmoe's Flower ServerApp and ClientApp.

Both read the run from Flower's run config: ``fedmoe-config`` (the resolved fedmoe config as YAML),
``run-dir`` (where the server writes the run directory, on the server machine) and ``resume``.
A ClientApp reads its own SuperNode's node config: ``partition-id`` (which client it is),
``data-path`` (its own data file; without it, its partition of the config's ``data.source``),
``state-dir`` (where its private state lives) and ``worker`` (the Unix socket of a ``fedmoe worker``
on this machine: the ClientApp then only relays each message to it, :mod:`.relay`).

Message types: ``query`` (which client are you; run your one-shot setup once per run), ``train`` and
``evaluate`` (your own model on your test data; when the run evaluates a global model other than the
clients' own, that model too, in the same message).
"""

from __future__ import annotations

from .relay import relay, worker_socket
from .secagg import is_secagg_message, secaggplus_mod_if_marked

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
    transport = FlowerTransport(grid, _config(opts), context=context)
    if opts.get("resume"):
        cfg, rd, ck = open_run_dir(opts["run-dir"], check_data=True)
        transport.cfg = cfg
        fed = Federation(cfg, rd, transport=transport, resuming=True, round_lines=True)
        print(f"fedmoe: resuming {rd.path} from round {ck.state['round']}; run id {ck.state['transport']['run_id']} "
              "(each client's store: <its state-dir>/<run id>/client-<N>)", flush=True)
        fed.resume(ck)
    else:
        cfg = _config(opts)
        print(f"fedmoe: run {opts['run-dir']}, run id {transport.run_id} (each client's store: "
              "<its state-dir>/<run id>/client-<N>)", flush=True)
        Federation(cfg, RunDir(opts["run-dir"]), transport=transport, round_lines=True).run()


def client_options(options, context) -> dict:
    """The run's options as a client takes them: as given in-process (Flower's simulation, whose ``state-root`` puts
    the clients' stores in the run directory), else the run config the server sent, without ``state-root``: where a
    SuperNode keeps its files — its private stores, its privacy ledger — is its own node config's word
    (``state-dir``, else the default), never the server's (which could otherwise have a node write anywhere its
    user may, or start a node's privacy ledger afresh in a new place)."""
    if options is not None:
        return dict(options)
    return {k: v for k, v in context.run_config.items() if k != "state-root"}


def client_reply(message, context, options=None):
    """The ClientApp: this SuperNode's client answers one message, here or (node config ``worker``)
    through the fedmoe worker beside the SuperNode, which keeps the model loaded. The relay path
    imports no torch."""
    global _CACHE
    from flwr.app import Message as FlowerMessage

    opts = client_options(options, context)
    kind, node = message.metadata.message_type, context.node_config
    deployed = options is None  # a SuperNode's ClientApp, not a simulated client in the server's process
    try:
        path = worker_socket(node)
        if path is not None:
            return FlowerMessage(relay(path, kind, message.content, opts, node), reply_to=message)
        if _CACHE is None or _CACHE.deployed != deployed:  # (one process running both: a notebook, the tests)
            from .client import ClientCache

            _CACHE = ClientCache(deployed=deployed)
        return FlowerMessage(_CACHE.reply(kind, message.content, opts, node), reply_to=message)
    except Exception as e:
        # Flower sends the server the text of what a ClientApp raises: on a node, only what quotes no data
        # (paths.node_error_text); the whole of it goes to this node's own output
        from .paths import node_error_text

        text = node_error_text(e, node, deployed)
        if text == f"{type(e).__name__}: {e}".strip():
            raise
        import sys
        import traceback

        traceback.print_exc(file=sys.stderr)
        raise NodeError(text) from None


class NodeError(RuntimeError):
    """An error of a node's ClientApp, as its server is told of it (:func:`.paths.node_error_text`)."""


def secagg_answer(message, context, options=None):
    """This client's update of the round, kept on its disk at its train message (``secagg-rNNNNN.npy`` and
    its weight beside it), as the SecAgg+ fit result the mod masks; the files are removed once read. No
    torch: this runs in the ClientApp process, which holds the mod's protocol state."""
    import json
    from pathlib import Path

    import numpy as np

    from .paths import node_identity, store_path
    from .secagg import read_secagg_instruction, secagg_reply

    opts = client_options(options, context)
    cid, _, state_dir = node_identity(context.node_config, opts)
    ins = read_secagg_instruction(message)
    if ins.config.get("fedmoe.client") != cid:
        raise ValueError(f"a SecAgg+ instruction for client {ins.config.get('fedmoe.client')} reached client {cid}")
    base = Path(store_path(state_dir, ins.config.get("fedmoe.run_id"), cid)) / f"secagg-r{ins.round_idx:05d}"
    if not base.with_suffix(".npy").is_file():
        raise RuntimeError(f"client {cid} has no update of round {ins.round_idx} to aggregate securely "
                           f"({base}.npy): it did not train in that round here")
    vector = np.load(base.with_suffix(".npy"), allow_pickle=False)
    weight = json.loads(base.with_suffix(".json").read_text())["weight"]
    reply = secagg_reply(message, vector, weight)
    base.with_suffix(".npy").unlink()
    base.with_suffix(".json").unlink()
    return reply


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

    @client_app.train(mods=[secaggplus_mod_if_marked])
    def _train(message, context):
        if is_secagg_message(message):  # SecAgg+'s collect stage: the update this client kept, masked by the mod
            return secagg_answer(message, context, options)
        return client_reply(message, context, options)

    @client_app.evaluate()
    def _evaluate(message, context):
        return client_reply(message, context, options)

    return server_app, client_app


def _deployment_apps():
    try:
        return make_apps()
    except ImportError:  # flwr not installed: the module stays importable
        return None, None


server_app, client_app = _deployment_apps()
