"""Named device classes (``meshllm/data/device_classes.json``) and device lists for the planner.

A device file is a JSON list whose entries are either a measured profile
(``DeviceProfile.to_json()``) or a reference to a class::

    [{"class": "rpi5", "name": "pi-a"}, {"class": "rpi5", "name": "pi", "count": 2},
     {"node_id": "n7", "name": "bench", "flops": 1.2e11, "mem_bandwidth_Bps": 2e10, "mem_bytes": 8e9}]

A class entry may override ``mem_bytes``; ``count: n`` makes ``name-1`` ...
``name-n``. The class figures carry their sources; :func:`load_device_classes`
is the one read of package data here, everything else is pure.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from meshllm.plan.errors import PlanError
from meshllm.profile import DeviceProfile, Link

DEVICE_CLASSES_FORMAT = "meshllm-device-classes"


@dataclass(frozen=True)
class DeviceClass:
    key: str
    name: str
    flops: float
    mem_bandwidth_Bps: float
    mem_bytes: float
    link: Link
    sources: Mapping[str, str]  # figure -> where it comes from
    notes: str = ""

    def profile(self, node_id: str, name: str | None = None, mem_bytes: float | None = None) -> DeviceProfile:
        return DeviceProfile(node_id=node_id, name=name or node_id, flops=self.flops,
                             mem_bandwidth_Bps=self.mem_bandwidth_Bps, mem_bytes=int(mem_bytes or self.mem_bytes),
                             device_class=self.key, default_link=self.link)


def _figure(d: Mapping[str, Any], key: str, where: str) -> tuple[float, str]:
    try:
        f = d[key]
        return float(f["value"]), str(f["source"])
    except (KeyError, TypeError, ValueError):
        raise PlanError(f"{where}: figure {key!r} needs a value and a source") from None


def parse_device_classes(data: Mapping[str, Any]) -> dict[str, DeviceClass]:
    if data.get("format") != DEVICE_CLASSES_FORMAT:
        raise PlanError(f"not a device class file (format={data.get('format')!r})")
    out = {}
    for key, c in data["classes"].items():
        where = f"device class {key!r}"
        flops, s_f = _figure(c, "flops", where)
        bw, s_b = _figure(c, "mem_bandwidth_Bps", where)
        mem, s_m = _figure(c, "mem_bytes", where)
        lat, s_l = _figure(c["link"], "latency_s", where)
        lbw, s_lb = _figure(c["link"], "bandwidth_Bps", where)
        out[key] = DeviceClass(key, str(c["name"]), flops, bw, mem, Link(lat, lbw),
                               {"flops": s_f, "mem_bandwidth_Bps": s_b, "mem_bytes": s_m, "link.latency_s": s_l,
                                "link.bandwidth_Bps": s_lb}, str(c.get("notes", "")))
    return out


def load_device_classes() -> dict[str, DeviceClass]:
    """The classes shipped with meshllm."""
    text = resources.files("meshllm.data").joinpath("device_classes.json").read_text()
    return parse_device_classes(json.loads(text))


def parse_devices(entries: Any, classes: Mapping[str, DeviceClass], where: str = "devices") -> list[DeviceProfile]:
    """Profiles from a device file's JSON (see the module docstring)."""
    if not isinstance(entries, list) or not entries:
        raise PlanError(f"{where}: expected a non-empty JSON list of devices")
    out: list[DeviceProfile] = []
    for i, e in enumerate(entries):
        at = f"{where}[{i}]"
        if not isinstance(e, dict):
            raise PlanError(f"{at}: a device is a JSON object")
        if "class" in e:
            key = e["class"]
            if key not in classes:
                raise PlanError(f"{at}: unknown device class {key!r} (known: {', '.join(sorted(classes))})")
            base = str(e.get("node_id") or e.get("name") or key)
            count = int(e.get("count", 1))
            names = [base] if count == 1 else [f"{base}-{j + 1}" for j in range(count)]
            for n in names:
                out.append(classes[key].profile(n, n, e.get("mem_bytes")))
        else:
            try:
                out.append(DeviceProfile.from_json(e))
            except TypeError as err:
                raise PlanError(f"{at}: not a device profile nor a class entry ({err})") from None
    ids = [d.node_id for d in out]
    dup = sorted({n for n in ids if ids.count(n) > 1})
    if dup:
        raise PlanError(f"{where}: node ids must be unique, repeated: {', '.join(dup)}")
    return out


def class_devices(spec: Sequence[tuple[str, int]], classes: Mapping[str, DeviceClass] | None = None
                  ) -> list[DeviceProfile]:
    """Profiles for ``[("rpi5", 2), ("mini-pc", 1)]``: node ids ``rpi5-1``, ``rpi5-2``, ``mini-pc-1``."""
    classes = classes or load_device_classes()
    return [classes[k].profile(f"{k}-{j + 1}") for k, n in spec for j in range(n)]
