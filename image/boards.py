"""Boards as data: everything that differs between the USB armory Mk I, Mk II and the qemu stand-in.

Each board is one frozen ``Board`` value in ``BOARDS``. Code never branches on a board's name; it
reads these fields (how to boot, where the bootloader goes, which device tree, which console).
"""

from __future__ import annotations

import dataclasses

from clef_armory.errors import ConfigError
from image import uboot

MIB = 1 << 20
# The first partition starts at 5 MiB, as in the vendor's layout (the bootloader lives before it).
PARTITION_START = 5 * MIB
# Each system slot (p1, p2; image/disk.py): the root filesystem is about 400 MiB today, so a 1 GiB
# slot leaves room for a newer Debian, kernel or Clef without re-partitioning a provisioned device.
SLOT_SIZE = 1024 * MIB


@dataclasses.dataclass(frozen=True)
class Led:
    """A GPIO LED, as the device tree names it (``/sys/class/leds/<name>``)."""

    name: str


@dataclasses.dataclass(frozen=True)
class Bootloader:
    """Where a board's bootloader comes from and where it goes on the disk."""

    offset: int  # byte offset on the raw disk
    limit: int  # first byte the bootloader must not reach (partition start, or an env area)
    # One of the two sources below; a --bootloader FILE overrides either.
    deb_package: str | None = None  # Debian package that ships it...
    deb_path: str | None = None  # ...and its path inside the package
    uboot: uboot.Sources | None = None  # or built here from pinned sources (image/uboot.py)


@dataclasses.dataclass(frozen=True)
class DeviceTree:
    """The board's dtb: a file Debian's kernel ships, or our own .dts compiled at build time."""

    dtb_name: str  # file name under /boot/dtbs/ on the device
    from_kernel: str | None = None  # path glob inside the rootfs (Debian-shipped dtb)
    dts_file: str | None = None  # our source in image/dts/ (compiled against the kernel's dtsi)
    soc: str | None = None  # the SoC this dtb is for, where the board comes with more than one...
    alternatives: tuple[DeviceTree, ...] = ()  # ...and the dtbs for its other SoCs

    def for_soc(self, soc: str) -> DeviceTree:
        """The dtb for the ``soc`` setting (boards with a single SoC ignore it)."""
        if self.soc is None or soc == self.soc:
            return self
        for alt in self.alternatives:
            if alt.soc == soc:
                return alt
        choices = ", ".join([self.soc, *(a.soc or "" for a in self.alternatives)])
        raise ConfigError(f"no device tree for SoC {soc!r} on this board: choose one of {choices}")


@dataclasses.dataclass(frozen=True)
class Firmware:
    """What an emulated board's CPU starts (``qemu-system-arm -bios``): shipped next to the image as
    ``file_name``, never written into the disk, taken from a Debian package of the image's suite."""

    deb_package: str
    deb_path: str  # path inside the package
    file_name: str  # name in the build's outputs


@dataclasses.dataclass(frozen=True)
class Board:
    """One target. Every board boots the same way: U-Boot distro boot reads /boot/extlinux/extlinux.conf
    from the disk (the qemu board's U-Boot is its ``firmware``; real boards have it on the disk)."""

    name: str
    description: str
    console: str  # kernel console= value
    root_device: str  # what the kernel mounts; a PARTUUID keeps it independent of slot numbering
    gadget: bool  # usb0 is a USB gadget (configfs) rather than a renamed NIC
    hw_rng: bool
    leds: tuple[Led, ...] = ()
    device_tree: DeviceTree | None = None
    bootloader: Bootloader | None = None
    extra_cmdline: tuple[str, ...] = ()
    firmware: Firmware | None = None

    def cmdline(self, root: str) -> str:
        return " ".join(["root=" + root, "rw", "rootwait", f"console={self.console}", *self.extra_cmdline])


MK1 = Board(
    name="mk1",
    description="USB armory Mk I (i.MX53), microSD",
    console="ttymxc0,115200",
    root_device="partuuid",
    gadget=True,
    hw_rng=False,
    leds=(Led("LED"),),
    device_tree=DeviceTree(
        dtb_name="imx53-usbarmory.dtb",
        from_kernel="usr/lib/linux-image-*/imx53-usbarmory.dtb",
    ),
    bootloader=Bootloader(
        offset=1024,
        # Debian's U-Boot keeps its environment at 0x60000, inside its own binary: we never saveenv,
        # so the only hard limit is the partition.
        limit=PARTITION_START,
        deb_package="u-boot-imx",
        deb_path="usr/lib/u-boot/usbarmory/u-boot-dtb.imx",
    ),
)

MK2 = Board(
    name="mk2",
    description="USB armory Mk II (i.MX6ULZ/6UL), microSD or eMMC",
    console="ttymxc1,115200",
    root_device="partuuid",
    gadget=True,
    hw_rng=True,
    leds=(
        Led("LED_WHITE"),
        Led("LED_BLUE"),
    ),
    # The soc setting picks the dtb (and U-Boot's fdtfile): same board, imx6ulz.dtsi or imx6ul.dtsi.
    device_tree=DeviceTree(
        dtb_name="imx6ulz-usbarmory.dtb",
        dts_file="imx6ulz-usbarmory.dts",
        soc="imx6ulz",
        alternatives=(
            DeviceTree(
                dtb_name="imx6ul-usbarmory.dtb",
                dts_file="imx6ul-usbarmory.dts",
                soc="imx6ul",
            ),
        ),
    ),
    bootloader=Bootloader(
        offset=1024,
        # The Mk II U-Boot keeps its environment at 1 MiB: the bootloader must end before it.
        limit=1 * MIB,
        # Not in Debian or mainline U-Boot: built from the pinned release + the vendor's board patch.
        uboot=uboot.MK2,
    ),
)

QEMU = Board(
    name="qemu",
    description="qemu-system-arm -M virt stand-in (virtio disk, virtio NIC named usb0)",
    console="ttyAMA0",
    root_device="partuuid",
    gadget=False,
    hw_rng=False,
    # QEMU's virt machine hands U-Boot its own device tree, and U-Boot hands it on to the kernel:
    # no dtb in the image, no fdt line in extlinux.conf.
    firmware=Firmware(
        deb_package="u-boot-qemu",
        deb_path="usr/lib/u-boot/qemu_arm/u-boot.bin",
        file_name="u-boot.bin",
    ),
)

BOARDS: dict[str, Board] = {b.name: b for b in (MK2, MK1, QEMU)}
