"""Disk images: building them and writing them safely to block devices."""
