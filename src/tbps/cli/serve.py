"""``tbps serve``: the REST API and the search page over a gallery index (FastAPI + uvicorn)."""

from __future__ import annotations

import argparse
import gc
import importlib.util
import ipaddress
import os
import socket
import sys

from tbps.cli.common import DEFAULT_RESCORE, add_rescore_arguments, add_store_arguments, check_rescore_args

HELP = "serve a gallery index over HTTP: a REST API and a search page"

EPILOG = """\
examples:
  tbps serve gallery.idx                         # http://127.0.0.1:8000/
  tbps serve gallery.idx --port 9000 --checkpoint runs/cuhk/best.pt
  tbps serve qdrant://db.example:6333/people     # a gallery in a Qdrant collection
  TBPS_TOKEN=s3cret tbps serve gallery.idx --host 0.0.0.0
  tbps serve gallery.idx --rescore 128           # LAIP checkpoints: requests may ask for ITM re-scoring
  curl -s -H 'Authorization: Bearer s3cret' -H 'Content-Type: application/json' \\
       -d '{"text": "a woman in a red coat", "k": 5}' http://127.0.0.1:8000/search

re-scoring: with --rescore [K] (a checkpoint with a trained fusion encoder and ITM head, e.g.
recipe laip) a POST /search with "rescore": true re-orders the top K by the ITM head; without
--rescore such a request gets a 422. The page shows a "Re-score" box, and /stats a "rescore"
entry, only when it is available. --rescore and --rerank are alternatives (not combined).

routes: POST /search, POST /search/image, GET /images/ID, GET /thumbs/ID, GET /stats,
GET /health, GET / (the page), GET /openapi.json (the API schema).

auth: with --token (or $TBPS_TOKEN) every route but /health needs it, as
'Authorization: Bearer TOKEN' or ?token=TOKEN. Open the page as http://HOST:PORT/?token=TOKEN:
the server then sets an HttpOnly cookie and the page drops the token from its address.
The server binds to 127.0.0.1 unless --host says otherwise; a public --host without a token
prints a warning. ?token= values are kept out of the access log.

safety: requests must name this server in their Host header (IP addresses, localhost, the
--host name; --allow-host adds names), so a web page cannot reach it by DNS rebinding. Gallery
images are served only when they still are the files indexed (size, SHA-256, no symbolic link)
and with the type their content has; uploads decode with a pixel limit (413 beyond it).
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help=HELP, description=HELP + ".", epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_store_arguments(p, "index directory made by `tbps index build`, or a store: qdrant:PATH (Qdrant's "
                        "local engine) or qdrant://HOST[:PORT]/COLLECTION (a Qdrant server)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer requests whose Host header is NAME (repeatable). By default only "
                   "IP addresses, localhost and the --host name are answered: the guard against DNS rebinding")
    p.add_argument("--token", default=None,
                   help="require this token on every route but /health (default: $TBPS_TOKEN, else none)")
    p.add_argument("--checkpoint", metavar="CKPT",
                   help="checkpoint that encodes queries (default: the one the index was built with)")
    p.add_argument("--device", default="cpu", help="torch device for the model (default cpu)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads for encoding queries (default: half the cores, 1 to 4)")
    p.add_argument("--max-batch", type=int, default=32, metavar="N",
                   help="encode up to N concurrent text queries in one model call (default 32; 1: no batching)")
    # the names of tbps.retrieval.rerank.METHODS, written out to keep torch out of `tbps --help`
    p.add_argument("--rerank", default="none", choices=["none", "jaccard", "kreciprocal"],
                   help="re-rank each query's top candidates: jaccard (TextReID's neighbour re-rank) or "
                   "kreciprocal (default none; see tbps.retrieval.rerank)")
    p.add_argument("--rerank-depth", type=int, default=None, metavar="K",
                   help="candidates re-ranked per query (default: max(k, 100))")
    add_rescore_arguments(p, "let requests re-score their top K candidates with the checkpoint's ITM head "
                          f"(K default {DEFAULT_RESCORE}; LAIP checkpoints; a request asks with \"rescore\": true)")
    p.add_argument("--http", default="auto", choices=["auto", "httptools", "h11"],
                   help="uvicorn's HTTP/1.1 parser: httptools (C, installed with the [serve] extra) or h11 (pure "
                   "Python); auto (default) takes httptools when it is installed")
    p.add_argument("--loop", default="auto", choices=["auto", "uvloop", "asyncio"],
                   help="the event loop: uvloop (C, installed with the [serve] extra, not on Windows) or Python's "
                   "asyncio; auto (default) takes uvloop when it is installed")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level (default info)")
    p.set_defaults(func=run)


def default_threads() -> int:
    """Torch threads for serving: half the cores, at least 1, at most 4."""
    return max(1, min(4, (os.cpu_count() or 1) // 2))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_port_free(host: str, port: int) -> None:
    """Fail with one clear line before loading the model when the port is taken."""
    from tbps.cli.common import UserError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e} (pick another --port or --host)") from None


def allowed_hosts(host: str, extra=()) -> list[str]:
    """Host names the server answers besides IP literals and localhost: the bound name, and the
    machine's names when bound to every address (0.0.0.0, ::), plus ``extra`` (--allow-host)."""
    names = [h for h in extra if h]
    if host in ("0.0.0.0", "::", ""):
        names += [socket.gethostname(), socket.getfqdn()]
    elif not _is_ip(host):
        names.append(host)
    return sorted({n.lower().rstrip(".") for n in names if n})


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


def load_app(index_path, *, checkpoint=None, token=None, device="cpu", max_batch=32, rerank="none",
             rerank_depth=None, rescore=None, rescore_mode="itm", rescore_weight=0.002, hosts=None):
    """Open the index, load and check its encoder, and build the app (no server started).

    rescore: K, to let requests re-score their top K with the checkpoint's fusion encoder
    (``tbps.retrieval.rescore.SearchRescorer``, sharing the encoder's model). Every failure a user can
    cause (missing or corrupt index, missing or wrong checkpoint, a checkpoint that cannot
    re-score) raises an error marked ``user_error``, so ``tbps`` prints one line and exits 2.
    """
    from tbps.cli.common import UserError, index_tta, load_encoder, load_rescorer
    from tbps.index.vectorstore import open_store
    from tbps.serve import create_app

    if rescore is not None and rerank != "none":
        raise UserError(f"--rescore and --rerank {rerank} are alternatives: the ITM head re-orders the top K "
                        "by itself (pick one)")
    index = open_store(index_path)  # the folder's LocalStore (a GalleryIndex) or a QdrantStore
    checkpoint = checkpoint or index.checkpoint
    if not checkpoint:
        raise UserError(f"index {index_path} does not record its checkpoint; pass --checkpoint")
    encoder = load_encoder(str(checkpoint), device, image_tta=index_tta(index))  # image queries as the gallery
    index.check_encoder(encoder)
    reranker = None
    if rerank != "none":
        from tbps.retrieval.rerank import index_reranker

        reranker = index_reranker(rerank)
    rescorer = None
    if rescore is not None:
        rescorer = load_rescorer(encoder, mode=rescore_mode, weight=rescore_weight)
    return create_app(index, encoder, token=token, max_batch=max_batch, reranker=reranker, rerank_depth=rerank_depth,
                      rescorer=rescorer, rescore_depth=rescore or DEFAULT_RESCORE, allowed_hosts=hosts)


def run(args) -> int:
    from tbps.cli.common import UserError, resolve_store

    resolve_store(args)

    token = args.token if args.token is not None else os.environ.get("TBPS_TOKEN") or None
    if token is not None and not token.strip():
        raise UserError("--token is empty")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    if args.rerank_depth is not None and args.rerank_depth <= 0:
        raise UserError(f"--rerank-depth must be positive, got {args.rerank_depth}")
    if args.max_batch <= 0:
        raise UserError(f"--max-batch must be positive, got {args.max_batch}")
    rescore = check_rescore_args(args.rescore, args.rescore_mode, args.rescore_weight) or {}
    if rescore and args.rerank != "none":
        raise UserError(f"--rescore and --rerank {args.rerank} are alternatives: the ITM head re-orders the top K "
                        "by itself (pick one)")
    if args.threads is not None and args.threads <= 0:
        raise UserError(f"--threads must be positive, got {args.threads}")
    try:
        import uvicorn
    except ImportError:
        raise UserError("tbps serve needs the [serve] extra: pip install 'tbps[serve]'") from None
    for flag, module in (("http", "httptools"), ("loop", "uvloop")):
        if getattr(args, flag) == module and importlib.util.find_spec(module) is None:
            raise UserError(f"--{flag} {module}: {module} is not installed (pip install {module}, or leave "
                            f"--{flag} at auto)")
    if args.port:
        _check_port_free(args.host, args.port)
    # Few threads: queries arrive batched, and torch's intra-op threads on a busy machine
    # wait on each other (2 threads on 2 shared cores: 250-400 ms per query, 1 thread: 12 ms).
    import torch

    torch.set_num_threads(args.threads or default_threads())

    app = load_app(args.index, checkpoint=args.checkpoint, token=token, device=args.device, max_batch=args.max_batch,
                   rerank=args.rerank, rerank_depth=args.rerank_depth, rescore=args.rescore,
                   rescore_mode=rescore.get("mode", "itm"), rescore_weight=rescore.get("weight", 0.002),
                   hosts=allowed_hosts(args.host, args.allow_host))
    if not _is_loopback(args.host) and not token:
        print(f"tbps: warning: serving on {args.host} without a token: anyone who can reach this "
              "machine can search the gallery and fetch its images (set --token)", file=sys.stderr)
    n = len(app.state.live.get())
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"tbps: serving {n} images from {args.index} at http://{shown}:{args.port}/"
          + ("?token=..." if token else ""), file=sys.stderr, flush=True)
    from tbps.serve.auth import access_log_config

    # The model, tokenizer and index live as long as the server: keep them out of the cyclic
    # collector's full passes, which otherwise stop every request for ~300 ms every few seconds
    # under load (a p99 of 300 ms against 110 ms, bench/load_test.py).
    gc.collect()
    gc.freeze()
    try:  # ?token= never reaches the access log
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, log_config=access_log_config(),
                    http=args.http, loop=args.loop)
    finally:
        gc.unfreeze()  # served: a caller that goes on (tests, an embedding program) collects as before
    return 0
