"""Egress guard for tarflow's test runs, loaded into every Python process of a test session.

conftest.py puts this folder first on PYTHONPATH before any subprocess or Ray worker starts, so the driver,
Ray's workers and helpers, img2dataset and the S3 server all refuse to resolve or connect to anything but
loopback. Each attempt is appended to $TARFLOW_NETGUARD_LOG; conftest fails the test run if that file is
not empty at the end.
"""
import os
import sys

_LOG = os.environ.get("TARFLOW_NETGUARD_LOG")
_LOOPBACK_NAMES = {None, "", "localhost", "ip6-localhost", "ip6-loopback", "::1", "0.0.0.0", "::", "0"}


def _allowed(host) -> bool:
    if isinstance(host, bytes):
        host = host.decode(errors="ignore")
    if host in _LOOPBACK_NAMES:
        return True
    host = str(host)
    return host.startswith(("127.", "::ffff:127.")) or host == os.uname().nodename


def _guard(event, args):
    if event == "socket.getaddrinfo" or event.startswith("socket.gethostby"):
        host = args[0] if args else None
    elif event in ("socket.connect", "socket.sendto"):
        if len(args) < 2 or not isinstance(args[1], tuple):
            return  # Unix-domain sockets are local by construction
        host = args[1][0]
    else:
        return
    if _allowed(host):
        return
    if _LOG:
        try:
            with open(_LOG, "a") as f:
                f.write(f"pid {os.getpid()} {' '.join(sys.argv[:2])}: {event} {host!r}\n")
        except OSError:
            pass
    raise PermissionError(f"tarflow test netguard: {event} to {host!r} blocked (tests never use the network)")


sys.addaudithook(_guard)

# Chain to any other sitecustomize further down the path (e.g. a developer's own guard).
_here = os.path.dirname(os.path.abspath(__file__))
_rest = [p for p in sys.path if os.path.abspath(p or ".") != _here]
try:
    import importlib.machinery
    import importlib.util

    _spec = importlib.machinery.PathFinder.find_spec("sitecustomize", _rest)
    if _spec is not None and _spec.origin and os.path.dirname(os.path.abspath(_spec.origin)) != _here:
        _mod = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(_mod)
except Exception:
    pass
