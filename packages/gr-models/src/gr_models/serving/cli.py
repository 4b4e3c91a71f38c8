"""``gr-serve``: score candidates over HTTP from a model bundle or an exported package.

gr-serve --bundle runs/ranking-synthetic/model_bundle.pt --port 8080          # KV-cached scorer
gr-serve --package scoring.pt2 --port 8080                                    # AOTInductor, full recompute
gr-serve --bundle model_bundle.pt --export-package scoring.pt2                # write the package and exit
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from gr_models.serving.loading import backend_from_bundle, backend_from_package
from gr_models.serving.schema import RequestLimits
from gr_models.serving.server import ScoringServer

log = logging.getLogger("gr_serve")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gr-serve", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", help="model bundle (gr_models.serving.bundle) -> KV-cached scorer")
    src.add_argument("--package", help="AOTInductor scoring package (.pt2) -> full recompute per request")
    p.add_argument(
        "--mode",
        choices=("cached", "eager"),
        default="cached",
        help="with --bundle: KV-cached scorer, or full recompute with each batch of users in one forward",
    )
    p.add_argument("--export-package", metavar="PT2", help="with --bundle: write the AOTInductor package and exit")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    p.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="cached scorer compute dtype")
    p.add_argument("--cache-mb", type=int, default=512, help="K/V cache budget (MiB)")
    p.add_argument("--micro-batch", type=int, default=64, help="candidates per cached scoring call")
    p.add_argument("--max-candidates", type=int, default=1024)
    p.add_argument("--max-events", type=int, default=4096, help="new events in one request")
    p.add_argument("--max-users", type=int, default=100_000, help="users whose history is kept (LRU)")
    p.add_argument("--max-batch", type=int, default=32, help="requests the worker takes per group")
    p.add_argument("--batch-window-ms", type=float, default=2.0, help="how long a group waits for more requests")
    p.add_argument("--max-queue", type=int, default=1024, help="queued requests before 503")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    if args.export_package and not args.bundle:
        p.error("--export-package needs --bundle")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.export_package:
        from gr_models.inference.export import save_scoring_package
        from gr_models.serving.bundle import load_bundle

        bundle = load_bundle(args.bundle)
        path = save_scoring_package(bundle.model, args.export_package, bundle.model_version)
        log.info("wrote %s (model version %s)", path, bundle.model_version)
        return 0
    if args.bundle and args.mode == "cached":
        backend = backend_from_bundle(
            args.bundle,
            dtype=args.dtype,
            cache_bytes=args.cache_mb << 20,
            micro_batch=args.micro_batch,
            max_candidates=args.max_candidates,
            max_users=args.max_users,
        )
    elif args.bundle:
        backend = backend_from_bundle(args.bundle, "eager", dtype=args.dtype, max_users=args.max_users)
    else:
        backend = backend_from_package(args.package, max_users=args.max_users)
    limits = RequestLimits(max_candidates=args.max_candidates, max_events=args.max_events)
    server = ScoringServer(
        backend,
        host=args.host,
        port=args.port,
        limits=limits,
        max_batch=args.max_batch,
        batch_window_ms=args.batch_window_ms,
        max_queue=args.max_queue,
    )
    log.info("serving %s model %s on %s (GET /health, POST /score)", backend.name, backend.model_version, server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
