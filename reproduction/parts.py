"""The reproduction parts, in report order: part name -> its module.

Every part module has the same five names: its settings dataclass (``SETTINGS`` here), ``QUICK`` (test sizes),
``check(settings)`` (inputs refused before any part starts), ``run(args, settings, out) -> result dict`` and
``report(result) -> markdown lines`` / ``figure(ax, result)`` (its section of reproduction.md / panel of the .png).
"""
from __future__ import annotations

from types import ModuleType
from typing import Literal

from xclip.reproduction import coop, spatial, spelling, textspan, zerocap

Part = Literal["spelling", "coop", "spatial", "textspan", "zerocap"]
MODULES: dict[str, ModuleType] = {"spelling": spelling, "coop": coop, "spatial": spatial, "textspan": textspan,
                                  "zerocap": zerocap}
PARTS: tuple[str, ...] = tuple(MODULES)
SETTINGS: dict[str, type] = {"spelling": spelling.SpellingSettings, "coop": coop.CoopSettings,
                             "spatial": spatial.SpatialSettings, "textspan": textspan.TextspanSettings,
                             "zerocap": zerocap.ZerocapSettings}
# --quick: sizes for tests (a field still at its default takes the quick value; explicit other values win)
QUICK: dict[str, dict] = {name: m.QUICK for name, m in MODULES.items()}
