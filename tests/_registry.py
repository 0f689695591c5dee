"""A smoke-trained generator registered in a fresh SQLite store (shared by the registry tests)."""

from __future__ import annotations

import pickle
from pathlib import Path

from ldct.config import load_config
from ldct.registry import versions as registry_versions
from ldct.tracking import store as tracking_store
from ldct.training.checkpoint import load_state
from ldct.training.loop import run_local


def register_smoke(root: Path, study: str = "cli-test", onnx: bool = False) -> tuple[str, str, dict]:
    """(tracking URI, version, checkpoint state): 2 smoke iterations, registered as `candidate`.

    ``onnx`` off by default: the export takes ~15 s here and only the serving test checks it.
    """
    uri = f"sqlite:///{root / 'mlflow.db'}"
    session = run_local(load_config("smoke", ["train.iterations=2"]), checkpoint_root=root / "ckpt")
    state = load_state(session.checkpoints[-1])
    mlflow_client = tracking_store.client(uri)
    run = mlflow_client.create_run(tracking_store.ensure_experiment(mlflow_client, f"ldct/{study}"))
    version = registry_versions.register_state(state, run.info.run_id, uri, tags={"study": study}, onnx=onnx)
    return uri, str(version.version), state


class CreatesFile:
    """Pickles as "call open(path, 'w')": unpickling it creates ``path`` (an armed trap)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def check_trap_is_armed(marker: Path) -> None:
    """The trap really runs code under plain pickle (so a loader that refuses it is tested)."""
    pickle.loads(pickle.dumps(CreatesFile(marker))).close()
    assert marker.exists()
    marker.unlink()
