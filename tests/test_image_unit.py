"""Fast checks of the image builder's pure parts: boards, overlay rendering, input checks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from clef_armory.errors import BuildError
from image import archive, boards, disk, manifest, overlay, rootfs

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHRlc3RrZXl0ZXN0a2V5dGVzdGtleXRlc3RrZXl0ZXN0 test@laptop"


def _cfg(board: str, **network: str) -> overlay.DeviceConfig:
    b = boards.BOARDS[board]
    return overlay.DeviceConfig(
        board=b, suite="trixie", kernel_version="6.12.117+deb13-armmp",
        root="PARTUUID=0123abcd-01" if b.root_device == "partuuid" else b.root_device,
        authorized_key=KEY, clef_version="1.17.3", network=overlay.Network(**network),
        dtb_path=f"/boot/dtbs/{b.device_tree.dtb_name}" if b.device_tree else None,
    )


def _text(rendered: dict[str, bytes], path: str) -> str:
    return rendered[path].decode()


@pytest.mark.parametrize("name", sorted(boards.BOARDS))
def test_every_template_renders_for_every_board(name: str) -> None:
    rendered = overlay.render_all(_cfg(name))
    for path in ("/etc/nftables.conf", "/etc/ssh/sshd_config.d/armory.conf",
                 "/etc/systemd/system/clef-armory-agent.service", "/etc/clef-armory/agent.toml",
                 "/etc/systemd/network/10-usb0.network", "/etc/sudoers.d/armory"):
        assert path in rendered, path
    # Provisioning renders the rules on the device later; the agent's state directory is empty. The
    # data partition's root-owned ssh/ subtree carries the admin's key.
    assert [p for p in rendered if p.startswith("/var/lib/clef-armory/")] == [
        "/var/lib/clef-armory/ssh/authorized_keys/armory"]
    fstab = _text(rendered, "/etc/fstab").splitlines()
    assert ("LABEL=clef-data\t/var/lib/clef-armory\text4\t"
            "nodev,nosuid,noexec,noatime,x-systemd.device-timeout=600\t0\t2") in fstab


def test_board_specific_files_only_where_they_belong() -> None:
    qemu, mk1, mk2 = (overlay.render_all(_cfg(b)) for b in ("qemu", "mk1", "mk2"))
    assert "/usr/local/lib/clef-armory/usb-gadget" not in qemu
    assert "Driver=virtio_net" in _text(qemu, "/etc/systemd/network/10-usb0.link")
    for r in (mk1, mk2):
        assert "/boot/extlinux/extlinux.conf" in r
        assert "/etc/systemd/network/10-usb0.link" not in r
        assert "F=functions/ecm.usb0" in _text(r, "/usr/local/lib/clef-armory/usb-gadget")
    assert "console=ttymxc0,115200" in _text(mk1, "/boot/extlinux/extlinux.conf")
    assert "console=ttymxc1,115200" in _text(mk2, "/boot/extlinux/extlinux.conf")
    assert "fdt /boot/dtbs/imx6ulz-usbarmory.dtb" in _text(mk2, "/boot/extlinux/extlinux.conf")
    assert "root=PARTUUID=0123abcd-01" in _text(mk1, "/boot/extlinux/extlinux.conf")
    # Every board boots through extlinux.conf; qemu's U-Boot passes on QEMU's own device tree.
    ext = _text(qemu, "/boot/extlinux/extlinux.conf")
    assert "kernel /boot/vmlinuz-6.12.117+deb13-armmp" in ext and "\tinitrd /boot/initrd.img-" in ext
    assert "append root=PARTUUID=0123abcd-01 rw rootwait console=ttyAMA0" in ext
    assert "fdt" not in ext.split("label armory")[1]


def test_gadget_uses_fixed_macs_and_the_chosen_function() -> None:
    for fn in ("ecm", "ncm", "rndis"):
        script = _text(overlay.render_all(_cfg("mk2", usb_function=fn)),
                       "/usr/local/lib/clef-armory/usb-gadget")
        assert f"F=functions/{fn}.usb0" in script
        assert "1a:55:89:a2:69:41" in script and "1a:55:89:a2:69:42" in script
        assert ("os_desc" in script) == (fn == "rndis")
    with pytest.raises(BuildError, match="unknown USB network function"):
        _cfg("mk2", usb_function="wifi")


def test_dhcp_leases_only_the_laptop_address_without_router_or_dns() -> None:
    net = _text(overlay.render_all(_cfg("qemu")), "/etc/systemd/network/10-usb0.network")
    assert "Address=10.0.0.1/24" in net and "ConfigureWithoutCarrier=yes" in net
    assert "PoolOffset=2" in net and "PoolSize=1" in net
    assert "EmitRouter=no" in net and "EmitDNS=no" in net
    assert "MACAddress=1a:55:89:a2:69:42" in net and "Address=10.0.0.2" in net
    assert "Gateway" not in net


def test_firewall_and_sshd_policy() -> None:
    r = overlay.render_all(_cfg("mk2"))
    nft = _text(r, "/etc/nftables.conf")
    assert re.search(r"hook input priority filter; policy drop;", nft)
    assert re.search(r"hook forward priority filter; policy drop;", nft)
    assert 'iifname "usb0" tcp dport { 22, 8550 } accept' in nft
    assert 'iifname "usb0" udp sport 68 udp dport 67 accept' in nft
    sshd = _text(r, "/etc/ssh/sshd_config.d/armory.conf")
    for line in ("ListenAddress 10.0.0.1", "PasswordAuthentication no",
                 "KbdInteractiveAuthentication no", "PermitRootLogin no", "AllowUsers armory",
                 "AuthenticationMethods publickey"):
        assert line in sshd.splitlines()
    assert "HostKey /var/lib/clef-armory/ssh/ssh_host_ed25519_key" in sshd.splitlines()
    assert "AuthorizedKeysFile /var/lib/clef-armory/ssh/authorized_keys/%u" in sshd.splitlines()
    assert _text(r, "/var/lib/clef-armory/ssh/authorized_keys/armory").strip() == KEY
    unit = _text(r, "/etc/systemd/system/clef-armory-agent.service")
    for line in ("User=clef", "ProtectSystem=strict", "PrivateTmp=yes", "NoNewPrivileges=yes",
                 "CapabilityBoundingSet=", "StateDirectory=clef-armory/agent",
                 "RequiresMountsFor=/var/lib/clef-armory",
                 "ExecStart=/usr/bin/python3 -m armory_agent serve --config /etc/clef-armory/agent.toml"):
        assert line in unit.splitlines()
    assert any(line.startswith("RestrictAddressFamilies=") for line in unit.splitlines())


def test_modes_of_sensitive_files() -> None:
    assert overlay.MODES["/etc/clef-armory/agent.toml"] == ("root", "clef", 0o640)
    assert overlay.MODES["/etc/sudoers.d/armory"][2] == 0o440


def test_config_digest_changes_with_the_config() -> None:
    assert _cfg("mk2").digest() == _cfg("mk2").digest()
    assert _cfg("mk2").digest() != _cfg("mk1").digest()
    assert _cfg("mk2").digest() != _cfg("mk2", usb_function="ncm").digest()


def test_boards_are_consistent() -> None:
    assert boards.BOARDS["qemu"].bootloader is None
    for name in ("mk1", "mk2"):
        bl = boards.BOARDS[name].bootloader
        assert bl is not None and bl.offset == 1024 and bl.limit <= boards.PARTITION_START
    assert boards.BOARDS["mk2"].bootloader.limit == 1 << 20  # type: ignore[union-attr]
    assert [led.name for led in boards.MK2.leds] == ["LED_WHITE", "LED_BLUE"]
    assert boards.PARTITION_START == 5 * 1024 * 1024


def test_bootloader_must_fit_before_the_limit(tmp_path: Path) -> None:
    ok = tmp_path / "ok.imx"
    ok.write_bytes(b"\1" * 1000)
    assert disk.check_bootloader(ok, 1024, 1 << 20) == 1000
    big = tmp_path / "big.imx"
    big.write_bytes(b"\1" * ((1 << 20) - 1023))
    with pytest.raises(BuildError, match="must end before byte 1048576"):
        disk.check_bootloader(big, 1024, 1 << 20)
    empty = tmp_path / "empty.imx"
    empty.touch()
    with pytest.raises(BuildError, match="empty"):
        disk.check_bootloader(empty, 1024, 1 << 20)


def test_image_too_small_is_refused(tmp_path: Path) -> None:
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "big").write_bytes(b"\0" * (2 << 20))
    with pytest.raises(BuildError, match="too small for the root filesystem"):
        disk.check_size(tmp_path / "tree", 6 << 20)
    disk.check_size(tmp_path / "tree", 64 << 20)


def test_authorized_key_checks(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match=r"no SSH public key at .*--ssh-key"):
        manifest.read_authorized_key(tmp_path / "missing.pub")
    private = tmp_path / "id"
    private.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nxx\n-----END OPENSSH PRIVATE KEY-----\n")
    with pytest.raises(BuildError, match="private key"):
        manifest.read_authorized_key(private)
    two = tmp_path / "two.pub"
    two.write_text(KEY + "\n" + KEY + "\n")
    with pytest.raises(BuildError, match="exactly one"):
        manifest.read_authorized_key(two)
    good = tmp_path / "good.pub"
    good.write_text(KEY + "\n")
    assert manifest.read_authorized_key(good) == KEY


def test_fingerprint_matches_openssh_format() -> None:
    fp = manifest.fingerprint(KEY)
    assert fp.startswith("SHA256:") and "=" not in fp and len(fp) == 7 + 43


def _archives(*suites: str) -> archive.ArchiveState:
    uri = "http://deb.debian.org/debian"
    base, *extras = (archive.Release(archive.Archive(uri, s), 0, "13", "x",
                                     (("main/binary-armhf/Packages", s),)) for s in suites)
    return archive.ArchiveState(base, tuple(extras), archive.INCLUDED)


def test_rootfs_key_follows_its_inputs() -> None:
    base = rootfs.RootfsSpec(archives=_archives("trixie"))
    assert base.key() == rootfs.RootfsSpec(archives=_archives("trixie")).key()
    assert base.key() != rootfs.RootfsSpec(archives=_archives("bookworm")).key()
    assert base.key() != rootfs.RootfsSpec(archives=_archives("trixie", "trixie-security")).key()
    more = (*base.packages, "vim")
    assert base.key() != rootfs.RootfsSpec(archives=_archives("trixie"), packages=more).key()


def test_mmdebstrap_command_defers_the_initramfs_and_keeps_debs(tmp_path: Path) -> None:
    spec = rootfs.RootfsSpec(archives=_archives("trixie", "trixie-security", "trixie-updates"))
    cmd = rootfs.mmdebstrap_command(spec, tmp_path / "o.tar", tmp_path / "apt", tmp_path / "p")
    joined = "\n".join(cmd)
    assert "--architectures=armhf" in cmd and "--dpkgopt=force-confold" in cmd
    assert "MODULES=list" in joined and "update_initramfs=no" in joined
    assert "update-initramfs -c -k all" in joined
    assert "rm -f \"$1\"/etc/ssh/ssh_host_*" in joined
    assert cmd[-3:] == ["deb http://deb.debian.org/debian trixie main",
                        "deb http://deb.debian.org/debian trixie-security main",
                        "deb http://deb.debian.org/debian trixie-updates main"]
    bare = rootfs.mmdebstrap_command(spec, tmp_path / "o.tar", tmp_path / "apt", tmp_path / "p",
                                     keep_debs=False, tuned=False)
    assert "MODULES=list" not in "\n".join(bare)


def test_partuuid_and_identity_are_reproducible() -> None:
    a = disk.disk_identity("mk2:trixie:abc")
    assert a == disk.disk_identity("mk2:trixie:abc")
    assert a != disk.disk_identity("mk1:trixie:abc")
    assert re.fullmatch(r"[0-9a-f]{8}-01", disk.partuuid(a[0]))


def test_system_record_reaches_the_device_reader(tmp_path: Path) -> None:
    """What the build records about the system (suite, point release, security updates) is what
    `./do status` reads back on the device (armory_agent.sysinfo)."""
    from armory_agent import sysinfo

    fs = rootfs.Rootfs(tmp_path / "r.tar", "k", 0, {}, "6.12.117+deb13-armmp", True,
                       debian_version="13.8")
    state = _archives("trixie", "trixie-updates")
    state = archive.ArchiveState(state.base, state.extras, "unavailable: trixie-security: \"mid-sync\" <x>")
    record = manifest.system_record(fs, state, "0.9.1")
    cfg = overlay.DeviceConfig(**{**_cfg("qemu").__dict__, "system": record})
    rendered = overlay.render_all(cfg)
    assert sysinfo.read(tmp_path)["problem"].startswith("no /etc/clef-armory/system.json")
    (tmp_path / "etc" / "clef-armory").mkdir(parents=True)
    (tmp_path / "etc" / "clef-armory" / "system.json").write_bytes(rendered["/etc/clef-armory/system.json"])
    (tmp_path / "etc" / "debian_version").write_text("13.9\n")
    facts = sysinfo.read(tmp_path)
    assert facts["debian_version"] == "13.9" and facts["problem"] is None
    image = facts["image"]
    assert (image["suite"], image["debian_version"], image["agent_version"]) == ("trixie", "13.8", "0.9.1")
    assert image["security_updates"] == "unavailable: trixie-security: \"mid-sync\" <x>"
    assert image["archives"][1].startswith("deb http://deb.debian.org/debian trixie-updates main (")
    assert manifest.archive_fields(fs, state)["security_updates"] == image["security_updates"]


def test_agent_toml_is_the_agents_own_defaults() -> None:
    """The image's agent.toml, read by the agent, is exactly the agent's dataclass defaults (one
    source), and a changed default reaches the rendered file."""
    import tomllib

    from armory_agent import config as agent_config
    from armory_agent import usblink

    text = _text(overlay.render_all(_cfg("mk2")), "/etc/clef-armory/agent.toml")
    assert agent_config.from_mapping(tomllib.loads(text)) == agent_config.AgentConfig()
    assert agent_config.AgentConfig().listen.address == usblink.DEVICE_ADDRESS
    assert overlay.Network().device_address == usblink.DEVICE_ADDRESS
    env = overlay.environment(overlay.OVERLAY_DIR)
    defaults = agent_config.defaults()
    defaults["policy"]["max_body"] = 12345
    env.globals["agent_defaults"] = defaults
    changed = env.get_template("etc/clef-armory/agent.toml.j2").render(cfg=_cfg("mk2"))
    assert tomllib.loads(changed)["policy"]["max_body"] == 12345
    assert "max_body = 262144" in text
