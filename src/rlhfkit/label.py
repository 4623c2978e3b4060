"""`rlhfkit label <command>`: create labelling projects, add users, serve the web app, export judgments and let
the playground's simulated annotators label through the same service layer as people.

    rlhfkit label create   --db F --project P --prompts prompts.jsonl (--responses a.jsonl,b.jsonl | --models m1,m2)
                           [--criteria helpfulness,harmlessness,honesty | --mode attributes [--attributes a,b,c]]
    rlhfkit label add-user --db F --user NAME --role admin|annotator   (password from RLHFKIT_PASSWORD, a file or a prompt)
    rlhfkit label serve    --db F [--host 127.0.0.1 --port 8000 --trusted-proxy IP --secure-cookies]
    rlhfkit label users    --db F   (and reset-password, deactivate, reactivate, unlock, revoke-sessions --user U)
    rlhfkit label export   --db F (--project P | --run R) --output prefs.jsonl [--kto] [--by-criterion] [--reliability]
    rlhfkit label reliability --db F (--project P | --run R)   (each annotator's estimated accuracy and flag, JSON)
    rlhfkit label simulate --db F --project P [--annotators 13]

An entry point: the store commands live in `feedback.commands`, the web app in `feedback.web`, the simulated
annotators in `playground.simulate`; only this module joins them."""

from __future__ import annotations

from typing import Callable

from rlhfkit.errors import ConfigError, UserError
from rlhfkit.feedback.commands import (MIN_BODY_BYTES, LabelConfig, add_user, create, deactivate, export,
                                       parse_label_args, reactivate, reliability, reset_password, revoke_sessions,
                                       unlock, users)

__all__ = ["LabelConfig", "main", "parse_stage_args"]

parse_stage_args = parse_label_args  # the hook rlhfkit's CLI looks for


def _proxy(value: str) -> str:
    import ipaddress

    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ConfigError(f"--trusted-proxy {value!r} is not an IP address or network; name each proxy by address "
                          "(10.0.0.5) or network (10.0.0.0/8), never '*' or a host name.") from None
    return value


def serve(cfg: LabelConfig) -> None:
    proxies = [_proxy(p) for p in cfg.trusted_proxy]
    if cfg.max_body_bytes < MIN_BODY_BYTES:
        raise ConfigError(f"--max-body-bytes {cfg.max_body_bytes} is too small for a labelling form; use at least "
                          f"{MIN_BODY_BYTES}.")
    if cfg.rate_limit < 1:
        raise ConfigError(f"--rate-limit must be at least 1 request per minute, got {cfg.rate_limit}.")
    from rlhfkit.feedback.web.app import run_server  # the one module allowed to start the web app

    run_server(cfg.db, host=cfg.host, port=cfg.port, secret_file=cfg.secret_file, rate_limit=cfg.rate_limit,
               secure_cookies=cfg.secure_cookies, trusted_proxies=proxies, max_body_bytes=cfg.max_body_bytes)


def simulate(cfg: LabelConfig) -> dict:
    from rlhfkit.playground.simulate import simulate as run  # needs the playground only when asked for

    return run(cfg)


COMMAND_HANDLERS: dict[str, Callable[[LabelConfig], object]] = {
    "create": create, "add-user": add_user, "serve": serve, "export": export, "simulate": simulate, "users": users,
    "reset-password": reset_password, "deactivate": deactivate, "reactivate": reactivate, "unlock": unlock,
    "revoke-sessions": revoke_sessions, "reliability": reliability,
}


def main(cfg: LabelConfig) -> object:
    try:
        import sqlalchemy  # noqa: F401
    except ImportError:
        raise UserError("labelling needs the web extra; install it with pip install 'rlhfkit[web]'.") from None
    return COMMAND_HANDLERS[cfg.command](cfg)
