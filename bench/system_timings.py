"""Emulated-device timings: boot-to-sshd and boot-to-agent for guest configurations side by side.

    .venv/bin/python bench/system_timings.py [--image build/qemu/NAME.img] [--configs 512x2,1024x2,512x1]

Each configuration (MiB x CPUs) boots the qemu board's image once on a throwaway overlay, waits for sshd's
banner and for the agent's /health, and powers it off. The table shows seconds and the ratio to the first
configuration. It also prints the system test's phase timings (build/system-test/timings.json) if present.
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


def boot_once(image: qemu.GuestImage, memory: int, cpus: int) -> dict[str, float]:
    guest = qemu.QemuGuest(image, memory_mib=memory, cpus=cpus, log=lambda _: None)
    with guest:
        t0 = time.monotonic() - guest.boot_seconds[-1]
        health = "no answer"
        while time.monotonic() - t0 < 900:
            try:
                health = guest.link(timeout=10).health().get("state", "?")
                break
            except ProvisionError:
                time.sleep(1.0)
        agent = time.monotonic() - t0
        stop0 = time.monotonic()
        clean = guest.stop()
        return {"sshd": guest.boot_seconds[-1], "agent": agent, "stop": time.monotonic() - stop0,
                "clean": float(clean), "health": 0.0 if health == "no answer" else 1.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=None)
    parser.add_argument("--configs", default="512x2,1024x2")
    args = parser.parse_args()
    settings = config.load().replace(board="qemu")
    image = qemu.find_image(settings, args.image)
    rows = []
    for spec in args.configs.split(","):
        memory, cpus = (int(x) for x in spec.split("x"))
        rows.append((spec, boot_once(image, memory, cpus)))
    base = rows[0][1]
    print(f"{'MiB x CPUs':<12} {'to sshd':>9} {'ratio':>6} {'to agent':>9} {'ratio':>6} "
          f"{'power-off':>10} clean")
    for spec, r in rows:
        print(f"{spec:<12} {r['sshd']:>8.1f}s {r['sshd'] / base['sshd']:>6.2f} {r['agent']:>8.1f}s "
              f"{r['agent'] / base['agent']:>6.2f} {r['stop']:>9.1f}s {'yes' if r['clean'] else 'no'}")
    timings = settings.output_dir / "system-test" / "timings.json"
    if timings.exists():
        print(f"\nsystem test phases ({timings}):")
        for name, seconds in json.loads(timings.read_text()).items():
            print(f"  {name:<40} {seconds:>8} s")


if __name__ == "__main__":
    main()
