"""Emulated-device timings: boot-to-sshd and boot-to-agent for guest configurations side by side.

    .venv/bin/python bench/system_timings.py [--image build/qemu/NAME.img] [--configs 512x2,1024x2,512x1]
    .venv/bin/python bench/system_timings.py --images BEFORE.img,AFTER.img [--configs 512x2]

Each configuration (MiB x CPUs) boots the qemu board's image once on a throwaway overlay, waits for sshd's
banner and for the agent's /health to leave "starting" (settled: "locked" on a provisioned disk, "error"
with no master seed on a fresh image), and powers it off. The table shows seconds and the ratio to the first
row. ``--images`` boots several images one after the other in the same run (e.g. before and after a change
to the boot, built side by side with ``./do build-image --board qemu --output DIR``) and writes the rows to
build/bench/system_timings.json. It also prints the system test's phase timings
(build/system-test/timings.json) if present.
These are emulation numbers on this machine, not the device's speed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from clef_armory import config
from clef_armory.errors import ProvisionError
from provision import qemu


def boot_once(image: qemu.GuestImage, memory: int, cpus: int) -> dict[str, float | str]:
    guest = qemu.QemuGuest(image, memory_mib=memory, cpus=cpus, log=lambda _: None)
    with guest:
        t0 = time.monotonic() - guest.boot_seconds[-1]
        # Until the agent has settled: "locked" on a provisioned disk, "error" (no master seed) on a
        # fresh image; "starting" and no answer mean it is still coming up.
        health = "no answer"
        while time.monotonic() - t0 < 900:
            try:
                health = guest.link(timeout=10).health().get("state", "?")
                if health != "starting":
                    break
            except ProvisionError:
                pass
            time.sleep(1.0)
        agent = time.monotonic() - t0
        stop0 = time.monotonic()
        clean = guest.stop()
        return {"sshd": guest.boot_seconds[-1], "agent": agent, "stop": time.monotonic() - stop0,
                "clean": float(clean), "state": str(health)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=None)
    parser.add_argument("--images", default="", help="comma-separated images to boot side by side")
    parser.add_argument("--configs", default="")
    args = parser.parse_args()
    settings = config.load().replace(board="qemu")
    images = [qemu.find_image(settings, Path(i)) for i in args.images.split(",")] if args.images else \
        [qemu.find_image(settings, args.image)]
    configs = (args.configs or ("512x2" if args.images else "512x2,1024x2")).split(",")
    rows: list[tuple[str, dict[str, float | str]]] = []
    for image in images:
        for spec in configs:
            memory, cpus = (int(x) for x in spec.split("x"))
            label = f"{image.image.parent.parent.name}/{spec}" if args.images else spec
            print(f"booting {image.image} ({spec}) ...", flush=True)
            rows.append((label, boot_once(image, memory, cpus)))
    base = rows[0][1]
    print(f"{'image/MiB x CPUs':<28} {'to sshd':>9} {'ratio':>6} {'to agent':>9} {'ratio':>6} "
          f"{'power-off':>10} clean  agent state")
    for label, r in rows:
        sshd, agent = float(r["sshd"]), float(r["agent"])
        print(f"{label:<28} {sshd:>8.1f}s {sshd / float(base['sshd']):>6.2f} {agent:>8.1f}s "
              f"{agent / float(base['agent']):>6.2f} {float(r['stop']):>9.1f}s "
              f"{'yes' if r['clean'] else 'no ':<6} {r['state']}")
    if args.images:
        out = settings.output_dir / "bench" / "system_timings.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps([{"image": str(i.image), "configs": configs} for i in images]
                                  + [{"row": label, **r} for label, r in rows], indent=2) + "\n")
        print(f"written to {out}")
    timings = settings.output_dir / "system-test" / "timings.json"
    if timings.exists():
        print(f"\nsystem test phases ({timings}):")
        for name, seconds in json.loads(timings.read_text()).items():
            print(f"  {name:<40} {seconds:>8} s")


if __name__ == "__main__":
    main()
