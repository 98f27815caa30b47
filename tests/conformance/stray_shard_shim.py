"""A deliberately broken agent: the Python shim that also publishes each report under a
shard that is not its device's (SPEC 3.1). A topic ACL cannot stop that (it allows the
device's id under any shard level), so the kit must. Run as ``python stray_shard_shim.py
SHIM-ARGS...``.
"""

from __future__ import annotations

import sys
from typing import Any

from setpoint.cli import main
from setpoint.device_shim import link

_publish = link.Link.publish


def _publish_also_under_another_shard(
    self: Any, topic: str, payload: bytes, *, retain: bool = True
) -> bool:
    sent = _publish(self, topic, payload, retain=retain)
    levels = topic.split("/")
    if sent and levels[-1] == "reported":
        levels[-4] = "0" if levels[-4] != "0" else "1"  # shards/<s>/devices/<id>/reported
        _publish(self, "/".join(levels), payload, retain=retain)
    return sent


link.Link.publish = _publish_also_under_another_shard  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main(["shim", *sys.argv[1:]]))
