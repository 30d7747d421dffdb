"""`kubetune-operator` / `python -m kubetune.operator`: run the operator."""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kubetune-operator", description=__doc__)
    parser.add_argument(
        "--namespace", "-n", action="append", default=None,
        help="namespace to watch (repeatable); default: $KUBETUNE_WATCH_NAMESPACES (comma-separated), "
             "or every namespace when that is empty",
    )
    parser.add_argument("--metrics-port", type=int, default=int(os.environ.get("KUBETUNE_METRICS_PORT", "8080")),
                        help="port of the Prometheus /metrics endpoint (0 disables)")
    parser.add_argument("--liveness", default=os.environ.get("KUBETUNE_LIVENESS", "http://0.0.0.0:8081/healthz"),
                        help="liveness endpoint URL ('' disables)")
    parser.add_argument("--verbose", "-v", action="store_true", help="log every handler call")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    namespaces = args.namespace or [
        n.strip() for n in os.environ.get("KUBETUNE_WATCH_NAMESPACES", "").split(",") if n.strip()]
    os.environ["KUBETUNE_METRICS_PORT"] = str(args.metrics_port)

    import kopf  # imported here so that `--help` is instant

    import kubetune.operator.handlers  # noqa: F401  (registers the handlers)

    kopf.configure(verbose=args.verbose, log_prefix=True)
    kopf.run(
        standalone=True,  # one replica with a Recreate strategy: no peering objects needed
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=args.liveness or None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
