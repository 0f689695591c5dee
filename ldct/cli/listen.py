"""``ldct-best listen``: the denoiser as a DICOM node on the hospital network (docs/DESIGN.md §5c)."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

from ldct.deploy.denoise import Denoiser, load_denoiser
from ldct.deploy.export import export_bundle
from ldct.deploy.node import Destination, DicomNode, ModelIdentity, NodeConfig
from ldct.registry.load import load_registered
from ldct.registry.versions import CHAMPION, MODEL_NAME

NOT_A_DEVICE = (
    "research software, not a medical device: derived series are for research use, not for diagnosis"
)


def _registered_denoiser(args: argparse.Namespace, store: Path) -> tuple[Denoiser, dict[str, Any]]:
    alias = args.alias or (None if args.version else CHAMPION)
    generator, meta = load_registered(alias=alias, version=args.version, tracking_uri=args.tracking_uri)
    meta.setdefault("registered_model", MODEL_NAME)
    tags = meta.get("tags", {})
    # The path `ldct-best validate` measured and promoted, unless the operator says otherwise.
    backend = args.backend or tags.get("fps_backend") or "torch"
    precision = args.precision or tags.get("fps_precision") or "fp32"
    if precision not in ("fp32", "bf16"):
        # int8 needs calibration slices the node does not hold; fp32 on the same backend is exact.
        print(
            f"[ldct-node] the validated path is {backend} {precision}; the node runs {backend} fp32",
            file=sys.stderr,
        )
        precision = "fp32"
    if backend == "torch":
        return load_denoiser(generator=generator, meta=meta, precision=precision), meta
    bundle = store / "models" / f"v{meta['version']}-{str(meta.get('run_id', ''))[:12]}"
    if not (bundle / "model_card.json").exists():
        print(f"[ldct-node] exporting v{meta['version']} for {backend} into {bundle} (once)", file=sys.stderr)
        export_bundle(generator, meta, bundle, force=True)
    return load_denoiser(model_dir=bundle, backend=backend, precision=precision), meta


def cmd_listen(args: argparse.Namespace) -> int:
    try:
        if args.forward_dicomweb:
            destination = Destination.parse_url(args.forward_dicomweb)
        else:
            destination = Destination.parse_ae(args.forward)
    except ValueError as exc:
        print(f"ldct-best listen: {exc}", file=sys.stderr)
        return 2
    store = Path(args.store)
    if args.model:
        denoiser = load_denoiser(
            model_dir=args.model, backend=args.backend or "onnxruntime", precision=args.precision or "fp32"
        )
        meta = denoiser.meta
    else:
        denoiser, meta = _registered_denoiser(args, store)
    model = ModelIdentity.of(meta)
    config = NodeConfig(
        ae_title=args.ae_title,
        port=args.port,
        destination=destination,
        store=store,
        bind=args.bind,
        idle_s=args.idle,
        retry_base_s=args.retry_base,
        retry_max_s=args.retry_max,
        max_series_instances=args.max_series_instances,
        max_series_mb=args.max_series_mb,
        min_free_mb=args.min_free_mb,
        keep_hours=args.keep_hours,
    )
    node = DicomNode(config, denoiser, model)
    stop = {"signal": None}

    def on_signal(signum: int, _frame: Any) -> None:
        stop["signal"] = signum
        node.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    node.start()
    print(
        f"[ldct-node] {args.ae_title} listening on {args.bind}:{args.port} (C-ECHO; CT and Enhanced CT "
        f"storage); model {model.name} (DeviceUID {model.device_uid}) on {denoiser.backend}; "
        f"forward to {destination}; a series is complete after {args.idle:g} s without an instance; "
        f"spool {store}",
        flush=True,
    )
    print(f"[ldct-node] {NOT_A_DEVICE}", flush=True)
    node.wait()
    node.stop()
    print(f"[ldct-node] stopped (signal {stop['signal']}); pending series stay in {store}", flush=True)
    return 0
