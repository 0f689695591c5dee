"""End-to-end seconds of the DICOM node for a 100-slice 512x512 CT series on this machine.

A modality (pynetdicom SCU) sends the series to `ldct.deploy.node.DicomNode` in this process;
the node spools it (fsync per instance), waits --idle seconds without an instance, denoises
every slice and forwards the derived series by C-STORE to a receiving SCP that writes each
instance to disk (Orthanc's role in the tests; here a pynetdicom SCP, so that the figure is the
node's own). Printed: receive, idle wait, denoise and forward seconds, the total, the share of
the total spent denoising, and per-slice denoise milliseconds.

The slices: --distinct phantom slices through the project's CT simulator at quarter dose
(512x512, 0.7 mm pixels), sent --slices times in all under distinct UIDs (content does not
change any step's cost). The model: the profile's generator with untrained weights (its cost
does not depend on them), on --backend torch (eager fp32) or onnxruntime (exported once).

    .venv/bin/python benchmarks/dicom_node.py                       # quick profile, torch
    .venv/bin/python benchmarks/dicom_node.py --backend onnxruntime --profile paper
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/inference.py

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from ldct.config import load_config  # noqa: E402
from ldct.data.phantoms import make_phantom  # noqa: E402
from ldct.data.simulate import simulate_low_dose  # noqa: E402
from ldct.data.writer import write_ct_slice  # noqa: E402
from ldct.deploy.denoise import load_denoiser  # noqa: E402
from ldct.deploy.node import Destination, DicomNode, ModelIdentity, NodeConfig  # noqa: E402
from ldct.models.generator import build_generator  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _series(out: Path, slices: int, distinct: int, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    images = []
    for i in range(distinct):
        anatomy = make_phantom(512, rng, pixel_size_mm=0.7, z_mm=5.0 * i)
        images.append(simulate_low_dose(anatomy, 0.25, rng, pixel_size_mm=0.7, noise_free=True))
        print(f"[bench] simulated slice {i + 1}/{distinct}", flush=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for i in range(slices):
        path = out / f"{i:03d}.dcm"
        write_ct_slice(
            path, images[i % distinct], patient="BENCH", study_uid=study, series_uid=series, frame_uid=frame,
            sop_uid=generate_uid(), series_description="bench quarter dose", series_number=2, instance=i + 1,
            position=(0.0, 0.0, 1.0 * i), spacing=(0.7, 0.7), thickness=1.0,
        )  # fmt: skip
        paths.append(path)
    return paths


def _sink(port: int, out: Path, received: list[float]) -> object:
    """A receiving SCP that writes each instance to disk (the PACS's part, minimal)."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    def handle(event) -> int:
        (out / f"{event.request.AffectedSOPInstanceUID}.dcm").write_bytes(event.encoded_dataset())
        received.append(time.perf_counter())
        return 0x0000

    ae = AE(ae_title="SINK")
    ae.supported_contexts = AllStoragePresentationContexts
    return ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle)])


def _send(port: int, paths: list[Path]) -> None:
    from pynetdicom import AE

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(pydicom.uid.CTImageStorage, pydicom.uid.ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="LDCTNODE")
    assert assoc.is_established, "the node refused the association"
    for path in paths:
        status = assoc.send_c_store(pydicom.dcmread(path))
        assert status and status.Status == 0, status
    assoc.release()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--backend", default="torch", choices=["torch", "onnxruntime"])
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--distinct", type=int, default=10)
    parser.add_argument("--idle", type=float, default=2.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    # Untrained weights: the cost does not depend on them, and no ImageNet weights are offline.
    cfg = load_config(args.profile, ["model.encoder_weights=none"])
    generator = build_generator(cfg.model, cfg.normalization).eval()
    meta = {
        "registered_model": f"bench-{args.profile}",
        "version": 0,
        "run_id": "bench",
        "normalization": {"hu_min": cfg.normalization.hu_min, "hu_max": cfg.normalization.hu_max},
        "config": {},
    }
    with tempfile.TemporaryDirectory(prefix="ldct-node-bench-") as tmp:
        root = Path(tmp)
        if args.backend == "torch":
            denoiser = load_denoiser(generator=generator, meta=meta)
        else:
            from ldct.deploy.export import export_bundle

            export_bundle(generator, meta, root / "bundle")
            denoiser = load_denoiser(model_dir=root / "bundle", backend="onnxruntime")
        (root / "in").mkdir()
        (root / "sink").mkdir()
        paths = _series(root / "in", args.slices, args.distinct, seed=0)
        received: list[float] = []
        sink_port, node_port = _free_port(), _free_port()
        sink = _sink(sink_port, root / "sink", received)
        lines: list[str] = []
        config = NodeConfig(
            ae_title="LDCTNODE", port=node_port, store=root / "spool", idle_s=args.idle,
            destination=Destination.parse_ae(f"SINK@127.0.0.1:{sink_port}"),
        )  # fmt: skip
        node = DicomNode(config, denoiser, ModelIdentity.of(meta), log=lines.append)
        node.start()
        try:
            t0 = time.perf_counter()
            _send(node_port, paths)
            t_received = time.perf_counter()
            print(f"[bench] {args.slices} slices received in {t_received - t0:.1f} s; waiting", flush=True)
            deadline = time.monotonic() + 3600
            while len(received) < args.slices and time.monotonic() < deadline:
                time.sleep(0.05)
            t_end = time.perf_counter()
        finally:
            node.stop()
            sink.shutdown()
        events = node.spool.events()
        # Journal times are wall clock: the denoise span runs from the idle timer's end to its line.
        wall_denoised = next(e["t"] for e in events if e["event"] == "denoised")
        wall_forwarded = next(e["t"] for e in events if e["event"] == "forwarded")
        denoise_line = next(line for line in lines if "denoised in" in line)
        denoise_s = float(denoise_line.split("denoised in ")[1].split(" s")[0])
        forward_s = wall_forwarded - wall_denoised
        total = t_end - t0
        result = {
            "slices": args.slices,
            "size": 512,
            "profile": args.profile,
            "backend": denoiser.backend,
            "receive_s": round(t_received - t0, 2),
            "idle_wait_s": args.idle,
            "denoise_s": round(denoise_s, 2),
            "denoise_ms_per_slice": round(1000 * denoise_s / args.slices, 1),
            "forward_s": round(forward_s, 2),
            "total_s": round(total, 2),
            "denoise_share": round(denoise_s / total, 3),
            "cpu": os.cpu_count(),
        }
    print(
        f"{args.slices} slices 512x512, {args.profile} generator on {result['backend']}: receive "
        f"{result['receive_s']} s, idle wait {args.idle:g} s, denoise {result['denoise_s']} s "
        f"({result['denoise_ms_per_slice']} ms/slice), forward {result['forward_s']} s; end to end "
        f"{result['total_s']} s, {100 * result['denoise_share']:.0f} % denoising"
    )
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
