"""The measured parts of a memory plan, kept on disk so a second start skips the profile run.

The activation peak and the runtime overhead are what a profile run measures; they follow from
the model's shape and weight bytes, the profile, the engine's limits (dtype, backend, batch
and context sizes, graphs) and the software versions, so those are the key. A change to any of
them is a new key, hence a new measurement; nothing is ever invalidated in place. Files live in
`$EDGEPAGED_CACHE/plans` (default ~/.cache/edgepaged/plans), one small JSON file per key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..config import EngineConfig
from ..models.config import ModelConfig
from ..models.loader import cache_root
from ..profiles import DeviceProfile

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class MeasuredParts:
    """What the profile run measured, in bytes."""

    activation_bytes: int
    overhead_bytes: int


@dataclass(frozen=True, slots=True)
class PlanKey:
    """Everything the measured parts depend on, as JSON-ready values."""

    fields: dict[str, Any]

    @classmethod
    def of(
        cls, config: EngineConfig, model: ModelConfig, profile: DeviceProfile, *, weights_bytes: int, max_model_len: int
    ) -> PlanKey:
        device = config.device
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        fields = {
            "edgepaged": __version__,
            "torch": torch.__version__,
            "device": where,
            "profile": profile.model_dump(mode="json"),
            "model": dataclasses.asdict(model),
            "weights_bytes": weights_bytes,
            "engine": {
                "dtype": str(config.dtype),
                "backend": config.backend,
                "block_size": config.block_size,
                "max_model_len": max_model_len,
                "max_num_seqs": config.max_num_seqs,
                "max_num_batched_tokens": config.max_num_batched_tokens,
                # None defers to this variable, so it is part of what was measured.
                "cuda_graphs": config.cuda_graphs,
                "cuda_graphs_env": os.environ.get("EDGEPAGED_CUDA_GRAPHS"),
            },
        }
        # As a file reads it back (tuples become lists), so a stored key compares equal.
        return cls(json.loads(json.dumps(fields)))

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.fields, sort_keys=True).encode()).hexdigest()[:24]


class PlanCache:
    """Read and write measured parts; a file that cannot be read or written is a miss, never an
    error, because the fallback (measuring again) is always correct."""

    def __init__(self, root: Path | None = None):
        self.root = root or cache_root() / "plans"

    def path(self, key: PlanKey) -> Path:
        return self.root / f"{key.digest}.json"

    def get(self, key: PlanKey) -> MeasuredParts | None:
        try:
            raw = json.loads(self.path(key).read_text())
            if raw["key"] != key.fields:  # a digest collision, or a file edited by hand
                return None
            return MeasuredParts(int(raw["activation_bytes"]), int(raw["overhead_bytes"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: PlanKey, parts: MeasuredParts) -> None:
        """Write atomically (temporary file, then rename), so a concurrent start reads either
        nothing or a whole file."""
        record = {**dataclasses.asdict(parts), "key": key.fields}
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".plan-", suffix=".json")
        except OSError as exc:
            log.warning("could not keep the measured memory plan in %s: %s", self.root, exc)
            return
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path(key))
        except OSError as exc:
            os.unlink(tmp)
            log.warning("could not keep the measured memory plan in %s: %s", self.root, exc)
