"""What a run's method is, beyond its name: the server optimizer with its settings as resolved, FedProx's μ and
robust aggregation. One description, shown wherever the method is named: ``fedmoe run``'s banner, summary.json's
``method``, report.md's header and ``fedmoe compare``'s method row."""

from __future__ import annotations


def method_info(tree: dict) -> dict:
    """summary.json's ``method`` from a run's config as a plain tree (``config_to_dict(cfg)``, or a run directory's
    config.yaml as read): ``name``; ``server_optimizer``: None for plain FedAvg, else its name, η as resolved and the
    settings its update reads (:func:`fedmoe.algorithms.server_opt.effective`); ``proximal_mu``: FedProx's μ from
    the running method's own section (``algorithm.<name>.proximal_mu``) or FedIT's where the method honours it
    (``Method.reads``), None when 0 (no proximal term). A
    config.yaml written before ``train.proximal_mu`` moved into the method's section is read where it has it."""
    from ..algorithms.server_opt import effective

    tree = tree if isinstance(tree, dict) else {}
    alg = tree.get("algorithm") if isinstance(tree.get("algorithm"), dict) else {}
    own = alg.get(str(alg.get("name")))  # the running method's own section
    own = own if isinstance(own, dict) else {}
    train = tree.get("train") if isinstance(tree.get("train"), dict) else {}
    mu = own.get("proximal_mu", train.get("proximal_mu"))
    if mu is None:  # a method that honours another's FedProx (Method.reads): flame, scaffold, fcmoe, the rank methods
        from ..algorithms.registry import METHODS

        method = METHODS.get(str(alg.get("name")))
        for section in method.reads if method is not None else ():
            read = alg.get(section) if isinstance(alg.get(section), dict) else {}
            if "proximal_mu" in read:
                mu = read["proximal_mu"]
                break
    opt = alg.get("server_optimizer")
    return {"name": alg.get("name"), "server_optimizer": effective(opt if isinstance(opt, dict) else {}),
            "proximal_mu": mu if isinstance(mu, (int, float)) and not isinstance(mu, bool) and mu > 0 else None}


def _g(x) -> str:
    return f"{x:g}" if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


def server_optimizer_text(opt: dict) -> str:
    """``fedadam (η = 0.01, β1 = 0.9, β2 = 0.99, τ = 0.001)``: the optimizer and the settings its update reads."""
    names = (("lr", "η"), ("momentum", "momentum"), ("beta1", "β1"), ("beta2", "β2"), ("tau", "τ"))
    settings = [f"{sym} = {_g(opt[key])}" for key, sym in names if key in opt]
    if opt.get("convention") == "flower":
        settings.append("Flower's convention" + (": η bias-corrected each round" if opt["name"] == "fedadam" else ""))
    return opt["name"] + (f" ({', '.join(settings)})" if settings else "")


def robust_text(robust: dict) -> str:
    """``robust aggregation: median, each update's norm bounded to 1`` (``federation.robust`` as a dict)."""
    rule = str(robust.get("rule"))
    if rule == "trimmed_mean" and robust.get("trim") is not None:
        rule += f" (trim {_g(robust['trim'])})"
    if rule == "krum":
        rule += f" (f = {robust.get('krum_malicious')}, keep {robust.get('krum_keep') or 1})"
    bound = f", each update's norm bounded to {_g(robust['norm_bound'])}" if robust.get("norm_bound") else ""
    return f"robust aggregation: {rule}{bound}"


def method_parts(method: dict | None, robust: dict | None = None) -> list[str]:
    """What the method runs beyond its name, one phrase each (none for plain FedAvg without FedProx)."""
    parts = []
    opt = (method or {}).get("server_optimizer")
    if isinstance(opt, dict) and opt.get("name"):
        parts.append("server optimizer " + server_optimizer_text(opt))
    mu = (method or {}).get("proximal_mu")
    if mu:
        parts.append(f"FedProx μ = {_g(mu)}")
    if isinstance(robust, dict) and robust.get("rule"):
        parts.append(robust_text(robust))
    return parts


def format_method(method: dict | None, robust: dict | None = None, name: str | None = None) -> str:
    """``fedit · server optimizer fedadam (η = 0.01, ...) · FedProx μ = 0.01``: the method's name and its parts."""
    return " · ".join([str(name or (method or {}).get("name") or "–"), *method_parts(method, robust)])


def config_robust(tree: dict) -> dict | None:
    """``federation.robust`` of a config tree, or None."""
    fed = tree.get("federation") if isinstance(tree, dict) else None
    robust = fed.get("robust") if isinstance(fed, dict) else None
    return robust if isinstance(robust, dict) else None


def run_banner(cfg) -> str:
    """``fedmoe run``'s first line after its name: ``fedit on builtin:tiny-moe, 4 clients, 3 rounds · server optimizer
    fedadam (η = 0.01, ...) · FedProx μ = 0.01`` (``cfg``: the RunConfig about to run)."""
    from ..config import config_to_dict

    tree = config_to_dict(cfg)
    return " · ".join([f"{cfg.algorithm.name} on {cfg.model.name}, {cfg.data.partition.num_clients} clients, "
                       f"{cfg.federation.rounds} rounds", *method_parts(method_info(tree), config_robust(tree))])
