"""``mnistrec serve``: the web app and the HTTP API on uvicorn."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import MnistrecError
from .common import add_backend, add_checkpoint, checkpoint_path


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``mnistrec serve`` and its options on ``sub``."""
    p = sub.add_parser("serve", help="the web app (draw a digit) and the HTTP API, on uvicorn",
                       description="Serve the drawing page at / and the HTTP API (/api, /v2, /docs) for one checkpoint.")
    add_checkpoint(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only; "
                   "0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    p.add_argument("--allowed-host", action="append", metavar="NAME",
                   help="also answer requests whose Host header is NAME (repeatable; '*.example.com' for subdomains, "
                        "'*' for any). By default only 127.0.0.1, localhost, [::1] and the --host address are "
                        "answered; any other Host gets 400 (a defence against DNS rebinding)")
    p.add_argument("--workers", type=int, default=1, help="worker processes, each with its own model (default: 1)")
    p.add_argument("--max-request-mb", type=float, default=10.0, help="largest request body in MiB (default: 10; 413 above)")
    p.add_argument("--max-batch", type=int, default=64, help="most images per request (default: 64)")
    p.add_argument("--model-name", default="mnistrec", help="model name in the /v2 protocol (default: mnistrec)")
    p.add_argument("--collect", metavar="DIR", help="let the page save drawings it got wrong, with the right digit, into "
                   "DIR/<digit>/ (off by default; `mnistrec finetune --images DIR` learns from them)")
    p.add_argument("--collect-max", type=int, metavar="N", default=10_000,
                   help="most images the --collect folder may hold (default: 10000; then 409)")
    add_backend(p, onnx_files=False)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run ``mnistrec serve`` with the parsed ``args``; returns the exit code."""
    try:
        import uvicorn

        from ..serve.app import create_app
    except ImportError as exc:
        raise MnistrecError(f"serving needs the 'serve' extra (pip install 'mnistrec[serve]'): {exc}") from None
    from ..serve.hosts import default_allowed_hosts
    from ..serve.service import MAX_BATCH_LIMIT

    if args.workers < 1 or not 0 < args.port < 65536 or not 1 <= args.max_batch <= MAX_BATCH_LIMIT or args.max_request_mb <= 0:
        raise MnistrecError(f"--workers must be >= 1, --max-batch in 1..{MAX_BATCH_LIMIT}, --port in 1..65535, "
                            "--max-request-mb > 0")
    allowed_hosts = default_allowed_hosts(args.host, args.allowed_host or [])
    settings = {"max_request_bytes": int(args.max_request_mb * 1024 * 1024), "max_batch_images": args.max_batch,
                "model_name": args.model_name, "backend": args.backend, "allowed_hosts": allowed_hosts,
                "collect_dir": args.collect, "collect_max_files": args.collect_max}
    if args.collect_max < 1:
        raise MnistrecError("--collect-max must be at least 1")
    checkpoint, _ = checkpoint_path(args)
    app = create_app(checkpoint, **settings)  # fails here, with one line, on a bad checkpoint
    if args.collect:
        print(f"mnistrec: saving corrections from the page into {args.collect} (at most {args.collect_max})", file=sys.stderr)
    print(f"mnistrec: serving {checkpoint} on http://{args.host}:{args.port}/ (API docs at /docs; Host names answered: "
          f"{', '.join(allowed_hosts)}; add others with --allowed-host)", file=sys.stderr)
    if args.workers == 1:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
        return 0
    # Several processes need an import string; each worker builds its own app from these variables.
    os.environ.update({"MNISTREC_SERVE_CHECKPOINT": str(checkpoint.resolve()),
                       "MNISTREC_SERVE_MAX_REQUEST_BYTES": str(settings["max_request_bytes"]),
                       "MNISTREC_SERVE_MAX_BATCH": str(args.max_batch), "MNISTREC_SERVE_MODEL_NAME": args.model_name,
                       "MNISTREC_SERVE_BACKEND": args.backend, "MNISTREC_SERVE_ALLOWED_HOSTS": ",".join(allowed_hosts),
                       "MNISTREC_SERVE_COLLECT": str(Path(args.collect).resolve()) if args.collect else "",
                       "MNISTREC_SERVE_COLLECT_MAX": str(args.collect_max)})
    del app
    uvicorn.run("mnistrec.serve.app:create_app_from_env", factory=True, host=args.host, port=args.port,
                workers=args.workers, log_level="warning")
    return 0
