"""`kdlab-report <sweep dir> --wandb` and `kdlab-report --wandb-push <spec.json>`: the sweep's W&B Report.

The specification is always written beside the local report first, so nothing is lost offline. The Report is saved
only when W&B is usable: not in offline mode, credentials present (checked locally, without prompting), and the W&B
host answering (TCP connect, TLS handshake) within a few seconds. Otherwise one line says what is missing and how to
push the specification later. Without that probe, each W&B API call waits about 20 s on a host that never
answers (measured with wandb 0.31), and a save makes several.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from kdlab.report.wandb_spec import check_specification, report_from_spec, sweep_specification

__all__ = ["build_report", "push_specification", "report_from_spec", "sweep_specification", "wandb_unavailable"]

SPEC_FILE = "wandb_report_spec.json"
PROBE_TIMEOUT_S = 3.0
SAVE_TIMEOUT_S = 120.0  # a reachable but unresponsive server must not hold the command forever


def build_report(sweep: Any, table_markdown: str, entity: str | None = None, project: str | None = None,
                 out_dir: str | Path | None = None) -> int:
    """Write the sweep's report specification to `<out_dir>/wandb_report_spec.json`, then save the W&B Report and
    print its URL when W&B is usable. Returns the exit code: 0 when the specification was written (saved or not),
    1 when no report can be built (the runs did not log to W&B) or W&B refused it."""
    try:
        spec = sweep_specification(sweep, table_markdown, entity=entity, project=project)
    except ValueError as err:
        print(f"W&B report: {err}")
        return 1
    path = Path(out_dir if out_dir is not None else sweep.directory) / SPEC_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec, indent=2) + "\n")
    missing = wandb_unavailable()
    if missing:
        print(f"W&B report not saved ({missing}); specification written to {path}, "
              f"push it later with: kdlab-report --wandb-push {path}")
        return 0
    return _save(spec, path)


def push_specification(path: str | Path) -> int:
    """Save the W&B Report of a specification written earlier by `build_report`, print its URL. Returns 0 when
    saved, 1 otherwise, with one line saying why (nothing pushed is a failure of this command)."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text())
        check_specification(spec)
    except (OSError, ValueError) as err:
        print(f"W&B report: cannot read {path}: {err}")
        return 1
    missing = wandb_unavailable()
    if missing:
        print(f"W&B report not saved ({missing}); retry with: kdlab-report --wandb-push {path}")
        return 1
    return _save(spec, path)


def wandb_unavailable(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """What keeps a report from being saved now, in a few words, or None when W&B looks usable. Checks, cheapest
    first: offline mode, credentials (environment, .netrc, wandb settings; never prompts), then the network."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in {"offline", "disabled", "dryrun"}:
        return f"WANDB_MODE={mode}: unset it to reach W&B"
    base_url = wandb_base_url()
    problem = _credentials_problem(base_url)
    if problem:
        return problem
    host, port, tls = _probe_address(base_url)
    try:
        with socket.create_connection((host, port), timeout=timeout) as connection:
            if tls:  # an intercepting firewall accepts any TCP connection; only W&B completes W&B's handshake
                context = ssl.create_default_context(cafile=os.environ.get("REQUESTS_CA_BUNDLE") or None)
                context.wrap_socket(connection, server_hostname=host).close()
            return None
    except OSError as err:  # ssl.SSLError and socket.timeout are OSErrors
        return f"no network: {host}:{port} unreachable within {timeout:g} s ({err.__class__.__name__})"


def wandb_base_url() -> str:
    """The W&B API server the client talks to: WANDB_BASE_URL, else wandb's configured default."""
    if os.environ.get("WANDB_BASE_URL"):
        return os.environ["WANDB_BASE_URL"].rstrip("/")
    try:
        from wandb.sdk import wandb_setup

        return str(wandb_setup.singleton().settings.base_url).rstrip("/")
    except Exception:  # an older or newer wandb layout: its long-standing public default
        return "https://api.wandb.ai"


def _credentials_problem(base_url: str) -> str | None:
    """Why no usable credentials for `base_url` exist locally, or None. Uses wandb's own lookup (environment,
    .netrc, settings) without prompting where this wandb has it."""
    login = f"not logged in to W&B at {base_url}: run `wandb login` or set WANDB_API_KEY"
    try:
        from wandb.sdk.lib.wbauth import authenticate_session
    except ImportError:
        authenticate_session = None
    if authenticate_session is not None:
        try:
            auth = authenticate_session(host=base_url, source="kdlab-report", prompt=False, update_session=False)
        except Exception as err:  # a malformed key or token file
            return f"W&B credentials unusable ({' '.join(str(err).split())}): run `wandb login --relogin`"
        return None if auth is not None else login
    if os.environ.get("WANDB_API_KEY"):
        return None
    import netrc

    try:
        found = netrc.netrc(os.environ.get("NETRC")).authenticators(urlparse(base_url).hostname)
    except (OSError, netrc.NetrcParseError):
        found = None
    return None if found else login


def _probe_address(base_url: str) -> tuple[str, int, bool]:
    """Host, port, and whether to complete a TLS handshake, that tell whether W&B can be reached: the proxy when
    one is set (a TCP connect), else the W&B host itself (TLS for https)."""
    url = urlparse(base_url)
    proxy = os.environ.get("HTTPS_PROXY" if url.scheme == "https" else "HTTP_PROXY") or os.environ.get(
        "https_proxy" if url.scheme == "https" else "http_proxy")
    if proxy:
        url = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        return url.hostname or "localhost", url.port or 80, False
    return url.hostname or "localhost", url.port or (443 if url.scheme == "https" else 80), url.scheme == "https"


def _save(spec: dict, path: Path) -> int:
    """Rebuild the Report and save it, within SAVE_TIMEOUT_S; print its URL or one line saying why not."""
    outcome: dict[str, Any] = {}

    def save() -> None:
        try:
            import wandb

            entity = spec.get("entity") or wandb.Api().default_entity
            report = report_from_spec(spec, entity=entity)
            report.save()
            outcome["url"] = report.url
        except Exception as err:  # the server's answer, in one line: wrong entity, project not synced, auth
            outcome["error"] = " ".join(str(err).split())[:300] or err.__class__.__name__

    worker = threading.Thread(target=save, daemon=True)
    worker.start()
    worker.join(SAVE_TIMEOUT_S)
    if "url" in outcome:
        print(f"W&B report saved: {outcome['url']}")
        return 0
    why = outcome.get("error", f"no answer within {SAVE_TIMEOUT_S:g} s")
    print(f"W&B report not saved ({why}); sync the runs first (wandb sync <run>/wandb/offline-run-*), "
          f"then retry with: kdlab-report --wandb-push {path}")
    return 1
