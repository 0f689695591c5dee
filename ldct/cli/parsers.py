"""The argument parsers of ``ldct`` and ``ldct-best``: argparse only, so ``--help`` starts at once.

Each command names its handler as ``"module:function"`` (``ldct.cli.<group>``); the dispatcher
in ``ldct.cli`` imports that module only when the command runs, because the handlers' modules
import the pipeline (torch, Ray, MLflow, timm take seconds to import).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ldct import __version__


def _add_data_commands(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="DICOM trees, the HU cache, the built-in set, LDCT baselines")
    cmds = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)

    p = cmds.add_parser(
        "builtin",
        help="write the built-in DICOM set (phantoms + real CT slices, simulated quarter dose) in Mayo layout",
    )
    p.add_argument("out", help="output directory (missing, empty, or a previous built-in tree)")
    p.add_argument(
        "--dose", type=float, default=0.25, help="low-dose fraction of the full dose (default 0.25)"
    )
    p.add_argument("--phantoms", type=int, default=6, help="number of phantom patients PH01.. (default 6)")
    p.add_argument("--slices", type=int, default=4, help="slices per phantom (default 4)")
    p.add_argument("--size", type=int, default=256, help="phantom image size in pixels (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler="ldct.cli.data:cmd_builtin")

    p = cmds.add_parser("index", help="read a DICOM tree once into the per-patient HU cache (incremental)")
    p.add_argument("root", help="DICOM root (Mayo 2016 or TCIA LDCT-and-Projection-data layout)")
    p.add_argument("--cache", required=True, help="cache directory (arrays + manifest.json)")
    p.add_argument(
        "--thickness",
        default="3mm",
        help="Mayo series thickness where a patient has several (default 3mm); a patient with one uses it",
    )
    p.add_argument("--skip-bad", action="store_true", help="skip and list bad files instead of stopping")
    p.add_argument("--val", nargs="+", default=[], metavar="P", help="validation patients")
    p.add_argument("--test", nargs="+", default=[], metavar="P", help="test patients")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler="ldct.cli.data:cmd_index")

    p = cmds.add_parser(
        "simulate",
        help="routine-dose CT (any layout or a plain folder) -> Mayo-layout full/quarter pairs",
        description="Simulate a lower dose from routine-dose CT with the projection-domain, "
        "dose-corrected noise insertion of the built-in set. Writes OUT/<patient>/{full,quarter}_<t>mm/; "
        "never writes into IN.",
    )
    p.add_argument("input", metavar="IN", help="input directory (Mayo/TCIA tree or any folder of CT slices)")
    p.add_argument("output", metavar="OUT", help="output directory (missing or empty)")
    p.add_argument(
        "--dose",
        type=float,
        default=0.25,
        help="effective dose to simulate, var(full)/var(low) in soft tissue (default 0.25)",
    )
    p.add_argument("--seed", type=int, default=0, help="noise seed; the same seed gives identical files")
    p.add_argument(
        "--i0",
        type=float,
        default=None,
        help="one full-dose flux per ray at 180 views for every slice, uncalibrated (default: each "
        "slice's flux calibrated to its own measured noise)",
    )
    p.add_argument(
        "--electronic-noise",
        type=float,
        default=None,
        help="electronic noise std in counts per reading at 180 views (default 5)",
    )
    p.add_argument("--skip-bad", action="store_true", help="skip and list bad files instead of stopping")
    p.add_argument(
        "--keep-transfer-syntax",
        action="store_true",
        help="write the input's transfer syntax where ldct can encode it (RLE, JPEG 2000 lossless)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler="ldct.cli.data:cmd_simulate")

    p = cmds.add_parser("baseline", help="LDCT-vs-full-dose metrics of a split (per patient and mean)")
    p.add_argument("cache", help="cache directory")
    p.add_argument("--split", default="test", help="train, val or test (default test)")
    _add_window_option(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler="ldct.cli.data:cmd_baseline")


def _add_window_option(p: argparse.ArgumentParser, default: str | None = "auto") -> None:
    p.add_argument(
        "--window",
        choices=("auto", "soft_tissue", "brain"),
        default=default,
        help="window of the body metrics: auto (from each slice's BodyPartExamined: head -> brain "
        "W80/L40, else soft tissue W400/L40), or one for every slice"
        + ("" if default else " (default: the profile's data.window, else auto)"),
    )


def _add_train_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="one training run (Ray Train), then the test-split table",
        description="Train the generator/critic pair with a profile, then score the test split: "
        "LDCT input, a Gaussian filter tuned on validation, and the denoised output.",
    )
    p.add_argument("--profile", default="quick", help="studies/<name>.toml or a .toml path (default: quick)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a profile value (repeatable)",
    )
    p.add_argument("--data", help="a cache directory made by `ldct data index` (default: the built-in set)")
    p.add_argument("--workers", type=int, help="Ray Train workers (0 = train in this process, no Ray)")
    p.add_argument("--storage", help="where Ray keeps runs and checkpoints (default ./runs)")
    p.add_argument("--json", action="store_true", help="end with one JSON line: ldct / classical / denoised")
    p.add_argument(
        "--check",
        action="store_true",
        help="only report every missing input (weights, data, storage, MLflow)",
    )
    p.add_argument(
        "--tracking-uri",
        help="log the run to this MLflow store (default: MLFLOW_TRACKING_URI if set, else no logging)",
    )
    p.set_defaults(handler="ldct.cli.train:cmd_train")


def _add_report_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="leaderboard, plots and best panel of a study, from MLflow")
    p.add_argument("study", help="study name (study.name of its profile, e.g. quick)")
    p.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--out", default="results", help="results root (default ./results)")
    p.add_argument("--profile", help="profile whose data scores the best trial on the test split")
    p.set_defaults(handler="ldct.cli.evaluate:cmd_report")


def _add_eval_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="every method on one split: LDCT, Gaussian, BM3D (tuned on val) and a model",
        description="Score one split of a cache, one table per slice and the mean ± std over slices, "
        "in both metric conventions: the LDCT input, a Gaussian filter and BM3D (each tuned on the "
        "validation split, never on the scored one) and, if given, a model.",
    )
    data = p.add_mutually_exclusive_group()
    data.add_argument("--data", help="a cache directory made by `ldct data index`")
    data.add_argument("--profile", help="use this profile's data (default: quick's built-in set)")
    p.add_argument("--split", default="test", help="train, val or test (default test)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="URI", help="registry URI, e.g. models:/ldct-denoiser@champion")
    src.add_argument(
        "--model-version", "--version", dest="model_version", metavar="V", help="registry version number"
    )
    src.add_argument("--checkpoint", metavar="DIR", help="a training checkpoint directory (state.pt)")
    src.add_argument("--onnx", metavar="DIR", help="an export directory (from `ldct-best export`)")
    p.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--no-bm3d", action="store_true", help="leave BM3D out (8-14 s of CPU per 512x512 slice)")
    _add_window_option(p, default=None)
    p.add_argument(
        "--tune-slices",
        type=int,
        default=None,
        help="validation slices used to tune Gaussian/BM3D (default 4)",
    )
    p.add_argument(
        "--tune-crop",
        type=int,
        default=None,
        help="tune on each validation slice's central NxN px (default: the profile's data.tune_crop, "
        "0 = whole slices; with --data 0)",
    )
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler="ldct.cli.evaluate:cmd_eval")


def _add_study_commands(sub: argparse._SubParsersAction) -> None:
    # The study parses its own options (ldct.study.main), so `ldct study --help` shows them.
    p = sub.add_parser("study", help="run (or --resume) the loss-weight study", add_help=False)
    p.set_defaults(handler="ldct.cli.study:cmd_study", passthrough=True)

    p = sub.add_parser(
        "repeat",
        help="a configuration x N seeds (mean ± std, paired test) or leave-one-real-slice-out (--protocol loso)",
        add_help=False,
    )
    p.set_defaults(handler="ldct.cli.repeat:cmd_repeat", passthrough=True)

    p = sub.add_parser("profiles", help="list the named profiles and the files they load from")
    p.set_defaults(handler="ldct.cli.study:cmd_profiles")

    cluster = sub.add_parser(
        "cluster", help="the Ray cluster: wait for its nodes (on the head), take it down"
    )
    cmds = cluster.add_subparsers(dest="cluster_command", metavar="COMMAND", required=True)
    p = cmds.add_parser("wait", help="wait until N Ray nodes (head included) have joined")
    p.add_argument("--nodes", type=int, required=True, help="nodes to wait for, the head included")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds before giving up (default 900)")
    p.set_defaults(handler="ldct.cli.study:cmd_cluster_wait")
    p = cmds.add_parser(
        "down",
        help="ray down, then stop Ray on each on-prem worker (which ray down leaves running); from the client",
    )
    p.add_argument("config", type=Path, help="the cluster config given to `ray up`, e.g. cluster/local.yaml")
    p.set_defaults(handler="ldct.cli.study:cmd_cluster_down")


def build_best_parser() -> argparse.ArgumentParser:
    """The parser of ``ldct-best``."""
    parser = argparse.ArgumentParser(prog="ldct-best", description="The registered ldct-denoiser model.")
    parser.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI or ./mlflow.db)")
    _add_global_options(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("show", help="registered versions with aliases, metrics and FPS")
    p.set_defaults(handler="ldct.cli.best:cmd_show")

    p = sub.add_parser(
        "validate",
        help="gate + time an inference path at 512x512; on pass move alias champion here",
        description="Judge the path (backend x precision) by the precision gate on the test split "
        "(window PSNR/SSIM and max |diff| vs fp32, deploy.gate_* keys), time the passing paths at "
        "512x512 batch 1 (the gate figure; batched throughput reported beside it), and promote the "
        "fastest that meets the bar.",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model-version", "--version", dest="version", help="registry version number")
    which.add_argument("--alias", default=None, help="registry alias (default: candidate)")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda if available")
    p.add_argument(
        "--iq-guard", choices=["quick", "full"], default=None,
        help="off by default: refuse a model whose low-contrast detectability (NPW AUC on the CCT189-like "
        "phantom) is below its LDCT input's on any insert, beyond the 95%% interval (quick: 192 px, "
        "20 realizations; full: 384 px, 60)",
    )  # fmt: skip
    p.add_argument(
        "--backend",
        default="torch",
        choices=["auto", *_backend_names()],
        help="inference runtime (default torch); auto = the fastest gated path of this device",
    )
    p.add_argument(
        "--precision",
        default=None,
        choices=["auto", "fp32", "bf16", "fp16", "int8"],
        help="default fp32 on CPU, fp16 on CUDA; auto = every precision this backend runs here",
    )
    p.add_argument(
        "--min-fps", type=float, help="bar (default 12.5 on CUDA, the paper's T4 figure; required on CPU)"
    )
    p.add_argument("--repeats", type=int, default=5, help="timed runs per batch size (median)")
    p.add_argument(
        "--size",
        type=int,
        default=512,
        help="timed image size (default 512, the paper's; smaller only for smoke checks, and tagged)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override the model's own config, e.g. deploy.gate_max_abs_hu=3 (repeatable)",
    )
    p.add_argument(
        "--on-cluster",
        action="store_true",
        help="gate and time in a Ray task holding one GPU (a T4 worker), not on this (head) machine",
    )
    p.add_argument("--gpu-timeout", type=float, default=900.0, help="seconds to wait for a GPU worker")
    p.set_defaults(handler="ldct.cli.best:cmd_validate")

    p = sub.add_parser(
        "export", help="write model.onnx, model.pt, model.xml/.bin (OpenVINO) and model_card.json"
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model-version", "--version", dest="version", help="registry version number")
    which.add_argument("--alias", default=None, help="registry alias (default: champion)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--force", action="store_true", help="overwrite an existing export")
    p.set_defaults(handler="ldct.cli.best:cmd_export")

    p = sub.add_parser("denoise", help="denoise a DICOM series into a new DICOM series")
    p.add_argument("input", help="input DICOM directory (never modified)")
    p.add_argument("output", help="output directory")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="an export directory (from `ldct-best export`)")
    src.add_argument("--alias", help="registry alias to load instead (e.g. champion)")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch", "openvino"])
    p.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16"],
        help="openvino/torch precision (bf16 only where the CPU has it natively; default fp32)",
    )
    p.set_defaults(handler="ldct.cli.best:cmd_denoise")

    _add_listen(sub)

    p = sub.add_parser(
        "migrate", help="re-register an old pickle-format version in the safe format (same aliases)"
    )
    p.add_argument("--model-version", "--version", dest="version", required=True, help="version number")
    p.set_defaults(handler="ldct.cli.best:cmd_migrate")
    return parser


def _backend_names() -> list[str]:
    # Names only (no runtime imports): ldct.deploy.backends imports torch, which --help must not wait for.
    return ["torch", "onnxruntime", "openvino", "torch-cuda", "onnxruntime-cuda", "tensorrt"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldct", description="Low-dose CT denoising study (ldct).")
    _add_global_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="GROUP", required=True)
    _add_data_commands(sub)
    _add_train_command(sub)
    _add_eval_command(sub)
    _add_study_commands(sub)
    _add_report_command(sub)
    _add_iq_commands(sub)
    return parser


def _add_global_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error too (or set LDCT_DEBUG=1)"
    )


def build_repeat_parser(prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    """The parser of ``ldct repeat`` and ``studies/repeat.py`` (ldct.cli.repeat.main)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--study", help="repeat this study's best trial configuration")
    src.add_argument(
        "--model-version",
        "--version",
        dest="version",
        help="repeat this registered ldct-denoiser version's configuration",
    )
    src.add_argument("--alias", help="repeat the registered version behind this alias (e.g. candidate)")
    parser.add_argument(
        "--protocol",
        choices=["seeds", "loso"],
        default="seeds",
        help="seeds: N seeds on the test split (default); loso: each real built-in slice is the test "
        "fold once, last checkpoint, K noise realizations, 95 %% t-interval over slices",
    )
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5; loso: 1)")
    parser.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="ARM[,ARM]",
        help="more arms, all at the tuned lr: paper-matched (the paper's λ's), l1, l1+perceptual, "
        "l1+adv, all (= the tuned arm), redcnn",
    )
    parser.add_argument(
        "--retune-lr",
        action="store_true",
        help="first give every arm its best lr of lr x {1/3, 1, 3} on validation",
    )
    parser.add_argument("--redcnn-study", help="the redcnn arm takes this study's best trial's model and lr")
    parser.add_argument("--folds", help="loso: only these real slices as test folds (e.g. ABDOMEN,SPINE)")
    parser.add_argument(
        "--no-bm3d",
        action="store_true",
        help="loso: leave the BM3D row out (8-14 s of CPU per 512² realization; no endpoint may name bm3d)",
    )
    parser.add_argument(
        "--realizations",
        type=int,
        default=None,
        help="loso: quarter-dose noise realizations per test slice (default 4)",
    )
    parser.add_argument(
        "--profile", help="budget and data (default: the source's own profile, else quick/paper as the study)"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI or ./mlflow.db)")
    parser.add_argument("--storage", help="Ray storage for the runs (default ./runs; shared on a cluster)")
    parser.add_argument("--results", default="results", help="where the report goes (default ./results)")
    return parser


def _add_listen(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "listen",
        help="run as a DICOM node: receive CT series, denoise, forward the derived series",
        description="A Storage SCP (C-ECHO; CT and Enhanced CT, compressed syntaxes too) that spools "
        "each instance durably, treats a series as complete after --idle seconds without an "
        "instance, denoises it with the registered model and forwards the derived series by "
        "C-STORE (--forward) or STOW-RS (--forward-dicomweb). Research software, not a medical "
        "device. docs/DESIGN.md §5c.",
    )
    p.add_argument("--ae-title", default="LDCTNODE", help="this node's AE title (default LDCTNODE)")
    p.add_argument("--port", type=int, default=11112, help="DICOM port to listen on (default 11112)")
    p.add_argument("--bind", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    dest = p.add_mutually_exclusive_group(required=True)
    dest.add_argument("--forward", metavar="AET@HOST:PORT", help="send derived series here by C-STORE")
    dest.add_argument("--forward-dicomweb", metavar="URL", help="send derived series here by STOW-RS")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--alias", help="registry alias (default: champion)")
    which.add_argument("--model-version", "--version", dest="version", help="registry version number")
    which.add_argument("--model", metavar="DIR", help="an export directory instead of the registry")
    p.add_argument(
        "--backend",
        choices=["torch", "onnxruntime", "openvino"],
        help="default: the path `ldct-best validate` promoted (tag fps_backend), else torch",
    )
    p.add_argument("--precision", choices=["fp32", "bf16"], help="default: the promoted path's, else fp32")
    p.add_argument("--store", default="ldct-node-spool", help="spool directory (default ./ldct-node-spool)")
    p.add_argument("--idle", type=float, default=5.0, help="seconds without an instance that end a series")
    p.add_argument("--retry-base", type=float, default=1.0, help="first forward retry delay, s (doubles)")
    p.add_argument("--retry-max", type=float, default=60.0, help="longest forward retry delay, s")
    p.add_argument("--max-series-instances", type=int, default=5000, help="refuse a larger series (0xA700)")
    p.add_argument("--max-series-mb", type=float, default=4096.0, help="refuse a larger series (0xA700)")
    p.add_argument("--min-free-mb", type=float, default=64.0, help="refuse instances below this free space")
    p.add_argument(
        "--keep-hours",
        type=float,
        default=24.0,
        help="remove a forwarded series' files after this (default 24)",
    )
    p.set_defaults(handler="ldct.cli.listen:cmd_listen")


def _add_iq_commands(sub: argparse._SubParsersAction) -> None:
    iq = sub.add_parser("iq", help="task-based image quality: NPS, TTF, low-contrast detectability")
    commands = iq.add_subparsers(dest="iq_command", metavar="COMMAND", required=True)
    p = commands.add_parser("nps", help="noise power spectrum of noise-only images (.npy or DICOM)")
    p.add_argument(
        "paths", nargs="+", help="a .npy stack [N, H, W] of noise-only images in HU, or DICOM files/directories "
        "(repeated scans of one position lose their ensemble mean)",
    )  # fmt: skip
    p.add_argument("--pixel-mm", type=float, help="pixel size of a .npy stack (DICOM: PixelSpacing)")
    p.add_argument("--roi", type=int, default=64, help="ROI side in pixels (default 64)")
    p.add_argument("--detrend", choices=["mean", "poly2"], default="mean", help="per-ROI detrending")
    p.add_argument(
        "--crop", type=float, help="central fraction of each image the ROIs tile (default: 1 for .npy, "
        "0.5 for DICOM, the uniform centre of a water phantom)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="one JSON line")
    p.set_defaults(handler="ldct.cli.iq:cmd_nps")

    p = commands.add_parser("lcd", help="signal-known-exactly detectability (NPW or CHO): AUC, d'")
    p.add_argument("present", help=".npy stack [N, H, W] of signal-present ROIs (HU)")
    p.add_argument("absent", help=".npy stack [N, H, W] of signal-absent ROIs (HU)")
    p.add_argument("--signal", required=True, help=".npy [H, W]: the expected signal (insert - background)")
    p.add_argument("--observer", choices=["npw", "cho"], default="cho")
    p.add_argument("--channels", type=int, default=10, help="CHO: Laguerre-Gauss channels (default 10)")
    p.add_argument("--channel-width-px", type=float, help="CHO: channel width a (default: signal diameter)")
    p.add_argument("--splits", type=int, default=10, help="CHO: random train/test halvings (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="one JSON line")
    p.set_defaults(handler="ldct.cli.iq:cmd_lcd")

    p = commands.add_parser("phantom", help="NPS, TTF and LCD of every method on digital phantoms")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="URI", help="registry URI, e.g. models:/ldct-denoiser@champion")
    src.add_argument("--checkpoint", metavar="DIR", help="a training checkpoint")
    src.add_argument("--onnx", metavar="DIR", help="an export directory (ldct-best export)")
    p.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument(
        "--quick", action="store_true", help="192 px at 1.2 mm, 20 realizations (else 384, 0.6, 60)"
    )
    p.add_argument("--dose", type=float, default=0.25, help="the LDCT dose (default 0.25)")
    p.add_argument("--observer", choices=["npw", "cho"], default="cho")
    p.add_argument("--gaussian-sigma-mm", type=float, default=1.0, help="the Gaussian row's σ (default 1 mm)")
    p.add_argument("--no-bm3d", action="store_true", help="leave out the BM3D row (its minute and more)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="directory for iq.md, iq.json and iq.png (e.g. results/quick/iq)")
    p.add_argument("--json", action="store_true", help="the whole table as one JSON line")
    p.set_defaults(handler="ldct.cli.iq:cmd_phantom")
