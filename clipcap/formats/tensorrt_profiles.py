"""The TensorRT bundle's profiles.json: which engine files it holds and the shapes each accepts.

A TensorRT bundle is the export bundle's `clipcap.json`, tokenizer and token table plus one
`.engine` per graph and `profiles.json`, which records each engine's optimisation profiles
(min/opt/max shape per input) and the decoding parity measured after the build. The decoder engine
is always built from the portable decoder kind (`TENSORRT_DECODER`). clipcap.export.tensorrt
writes it; the tensorrt runtime reads it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from clipcap.config import BundleError
from clipcap.formats.graph_specs import DECODER_KINDS, GraphSpec

PROFILES_FILE = "profiles.json"
TRT_FORMAT_VERSION = 1
TENSORRT_DECODER = DECODER_KINDS["concat"]  # the decoder kind engines are built from: standard ONNX operators only


@dataclass(frozen=True)
class Profile:
    name: str
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]  # input -> (min, opt, max)

    def to_dict(self) -> dict:
        return {"name": self.name, "shapes": {k: {"min": list(a), "opt": list(b), "max": list(c)}
                                              for k, (a, b, c) in self.shapes.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "Profile":
        return cls(data["name"], {k: (tuple(v["min"]), tuple(v["opt"]), tuple(v["max"]))
                                  for k, v in data["shapes"].items()})

    def fits(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        return all(all(lo <= s <= hi for lo, s, hi in zip(self.shapes[name][0], shape, self.shapes[name][2]))
                   for name, shape in shapes.items())

    def max_sizes(self, spec: GraphSpec) -> dict[str, int]:
        """The largest value of every symbolic dimension this profile allows (to size buffers once)."""
        sizes: dict[str, int] = {}
        for tensor in spec.inputs:
            for axis, dim in enumerate(tensor.shape):
                if isinstance(dim, str):
                    sizes[dim] = max(sizes.get(dim, 0), self.shapes[tensor.name][2][axis])
        return sizes


def load_profiles(path: Path) -> dict:
    """profiles.json of a TensorRT bundle, with each engine's profiles as `Profile`s."""
    profiles_file = Path(path) / PROFILES_FILE
    if not profiles_file.is_file():
        raise BundleError(f"{path}: not a TensorRT bundle (no {PROFILES_FILE}); build one with: "
                          f"python export/to_tensorrt.py MODEL_BUNDLE --out {path}")
    try:
        record = json.loads(profiles_file.read_text())
        if record.get("format_version") != TRT_FORMAT_VERSION:
            raise BundleError(f"{profiles_file}: unsupported format (this library reads version {TRT_FORMAT_VERSION})")
        for entry in record["engines"].values():
            entry["profiles"] = [Profile.from_dict(p) for p in entry["profiles"]]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as error:
        raise BundleError(f"{profiles_file}: malformed ({error!r})") from None
    return record
