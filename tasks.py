"""clef-armory tasks: a thin CLI over the library (see docs/design.md).

Each task parses its flags, calls one library function and prints a short result.
Errors from the library are one line (``--debug`` shows the traceback).
"""

from __future__ import annotations

from typing import Any

from invoke.context import Context
from invoke.tasks import task

from armory_agent.usblink import AGENT_PORT, DEVICE_ADDRESS, SSH_PORT
from clef_armory.cli import settings_from, user_errors
from clef_armory.config import Settings


def _settings_for_build(c: Context, board: str | None, say: bool = True, **overrides: object) -> Settings:
    """Settings whose board is --board, else the newest build's (and, if ``say``, a line on stderr)."""
    import sys

    from image import builds

    choice = builds.choose(settings_from(c, **overrides), board)
    if choice.note and say:
        print(choice.note, file=sys.stderr)
    return choice.settings


@task(
    help={
        "fast": "Run only the fast tier (unit + integration, no image builds or QEMU boots).",
        "k": "Only run tests matching this pytest -k expression.",
        "lint": "Run ruff and mypy before the tests (default on).",
    }
)
@user_errors
def test(c: Context, fast: bool = False, k: str = "", lint: bool = True) -> None:
    """Run ruff, mypy and the whole test suite (the CI command)."""
    from clef_armory import testrun

    testrun.run(settings_from(c), fast=fast, select=k, lint=lint)


@task(
    auto_shortflags=False,
    help={
        "board": "mk2 | mk1 | qemu (default: invoke.yaml).",
        "suite": "Debian suite of the device's root filesystem (default: invoke.yaml, trixie).",
        "mirror": "Debian mirror URL (default: invoke.yaml).",
        "clef": "Where Clef (ARMv7) comes from: source | release | path:FILE.",
        "ssh_key": "Admin's SSH public key for the device (default: ~/.ssh/id_ed25519.pub, else a key "
                   "pair made for it, ~/.ssh/clef-armory_ed25519).",
        "bootloader": "Bootloader file to write at the board's offset, instead of the board's own "
                      "(Mk II: U-Boot built from pinned sources).",
        "uboot_patch": "Local copy of the pinned Mk II U-Boot board patch, for machines that cannot "
                       "reach GitHub (its sha256 is checked).",
        "boot_medium": "Mk II U-Boot boots from: uSD | eMMC (default: invoke.yaml, uSD).",
        "memory": "Mk II DDR size: 512M | 1G (default: invoke.yaml, 512M).",
        "soc": "Mk II SoC: imx6ulz | imx6ul; picks U-Boot's fdtfile and the image's dtb (default: imx6ulz).",
        "size": "Raw image size, e.g. 3500M (default: invoke.yaml).",
        "output": "Output directory; the image goes to <output>/<board>/ (default: build/).",
        "usb_net": "USB network function: ecm (default), rndis or ncm (for Windows hosts).",
        "refresh_rootfs": "Rebuild the cached root filesystem (e.g. after a Debian point release).",
        "require_security_updates": "Fail when <suite>-security or <suite>-updates cannot be used (default: "
                                    "build without them, warn loudly, record it in the manifest).",
    },
)
@user_errors
def build_image(c: Context, board: str | None = None, suite: str | None = None,
                mirror: str | None = None, clef: str | None = None, ssh_key: str | None = None,
                bootloader: str | None = None, size: str | None = None, output: str | None = None,
                usb_net: str = "ecm", refresh_rootfs: bool = False, uboot_patch: str | None = None,
                boot_medium: str | None = None, memory: str | None = None, soc: str | None = None,
                require_security_updates: bool = False) -> None:
    """Build the device's disk image (rootfs cached; see docs/image.md)."""
    import sys
    from pathlib import Path

    from image import asroot
    from image.build import build_image as build

    settings = settings_from(c, board=board, suite=suite, mirror=mirror, clef_source=clef,
                             ssh_key=ssh_key, image_size=size, output_dir=output, uboot_patch=uboot_patch,
                             boot_medium=boot_medium, memory=memory, soc=soc,
                             security_updates="require" if require_security_updates else None)
    asroot.ensure_root()  # a normal user: the same command again under sudo
    with asroot.for_caller(settings):  # under sudo: the caller's ~, and the outputs go back to them
        result = build(settings, bootloader=Path(bootloader) if bootloader else None,
                       usb_function=usb_net, refresh_rootfs=refresh_rootfs)
    print(f"image: {result.image}")
    if result.manifest["security_updates"] not in ("included", "off"):
        print(f"WARNING: built without Debian's security updates: {result.manifest['security_updates']}",
              file=sys.stderr)


@task(
    auto_shortflags=False,
    help={
        "device": "Whole disk to write, e.g. /dev/sdX or /dev/disk/by-id/usb-... (never a partition).",
        "image": "Image to write (.img, .img.zst or .img.xz); default: newest in build/<board>/.",
        "bmap": "Block map of the image; default: the .bmap next to it.",
        "to_file": "Write to this regular file instead of a disk (for VMs).",
        "yes": "Do not ask to type the device name (the safety checks still run).",
        "verify": "Read every written block back and check it (default on; --no-verify skips).",
        "eject": "Power off / detach the device when done (default on; --no-eject keeps it).",
        "force": "Allow a disk whose transport is not USB or MMC (e.g. an internal or loop disk).",
        "emmc": "Mk II internal eMMC: guide through USB boot mode and expose it with armory-ums.",
        "ums_image": "armory-ums.imx for --emmc; default: <cache_dir>/armory-ums/armory-ums.imx.",
        "board": "Board whose newest image to use when --image is not given (default: the newest build).",
        "system_only": "Rewrite only the boot area and system slots; keep the data partition (keys).",
    }
)
@user_errors
def flash(c: Context, device: str = "", image: str = "", bmap: str = "", to_file: str = "",
          yes: bool = False, verify: bool = True, eject: bool = True, force: bool = False,
          emmc: bool = False, ums_image: str = "", board: str | None = None,
          system_only: bool = False) -> None:
    """Write the image to a microSD card or the Mk II eMMC: checked, fast, verified."""
    from pathlib import Path

    from image import flash as flashing
    from image.bmap import human_size

    settings = _settings_for_build(c, board)
    if emmc:
        if device or to_file:
            from clef_armory.errors import ConfigError

            raise ConfigError("--emmc finds the eMMC itself; do not combine it with --device or --to-file")
        device = flashing.expose_emmc(settings, Path(ums_image) if ums_image else None, print)
    request = flashing.FlashRequest(
        device=device, image=Path(image) if image else None, bmap=Path(bmap) if bmap else None,
        to_file=Path(to_file) if to_file else None, yes=yes, verify=verify, eject=eject,
        force=force, system_only=system_only)
    result = flashing.flash(settings, request)
    checked = f", verified {human_size(result.verify.bytes_read)}" if result.verify else ""
    print(f"wrote {human_size(result.write.bytes_written)} to {result.target} in "
          f"{result.write.seconds:.1f} s{checked}")
    if result.eject_note:
        print(result.eject_note)
    if emmc:
        print("slide the boot switch toward the eMMC to boot from it")


def _session(c: Context, board: str | None, host: str, port: int, user: str, identity: str,
             known_hosts: str, ssh_via: str = "", agent_via: str = "") -> Any:
    """The SSH session of unlock, check and status; the host key pinned by the chosen build."""
    from provision import commands

    settings = _settings_for_build(c, board, not known_hosts)
    return commands.session_for(settings, host, port, user, identity, known_hosts, ssh_via, agent_via)


_SSH_HELP = {
    "host": f"Device address over the USB link ({DEVICE_ADDRESS}).",
    "port": "SSH port on the device.",
    "user": "Admin user to log in as (the image's admin user, 'armory').",
    "identity": "SSH private key file (default: ssh-agent, then ~/.ssh/clef-armory_ed25519, id_ed25519, "
                "id_ecdsa, id_rsa).",
    "known_hosts": "known_hosts pinning the device's host key (default: build/<board>/known_hosts).",
    "password_file": "Read passwords once from this 0600 file ('master: ...', 'account: ...').",
    "json": "Print JSON for scripts instead of a table.",
    "board": "Which build/<board>/ pins the host key (default: the newest build in build/).",
    "ssh_via": "Dial sshd at HOST:PORT instead (run-qemu --link user's forwarded port); the host key "
               "pinned for --host is still required.",
    "agent_via": "Dial the agent at HOST:PORT instead (run-qemu --link user's forwarded port); requests "
                 "still say Host: 10.0.0.1:8550.",
}


@task(
    auto_shortflags=False,
    help={
        **_SSH_HELP,
        "accounts": "How many accounts the device should hold (new ones are created on the device).",
        "import_keystore": "Import this encrypted (v3) keystore file (the key has existed off the device).",
        "rules": "Clef rules.js file to install and attest.",
        "policy": "Policy YAML to render rules.js from (see docs/policy.md).",
        "chain_id": "Chain id for the policy's default and the agent (default: invoke.yaml).",
        "checks": "Run the key-handling checks at the end (default on).",
        "yes": "Attest new rules without asking (they are still shown).",
        "account_password": "New accounts: 'words' (generated, shown once on the terminal, fast signing) "
                            "or 'ask' (your own password, standard scrypt).",
    }
)
@user_errors
def provision(c: Context, host: str = DEVICE_ADDRESS, port: int = SSH_PORT, user: str = "armory",
              identity: str = "",
              known_hosts: str = "", accounts: int = 1, import_keystore: str = "", rules: str = "",
              policy: str = "", chain_id: int | None = None, password_file: str = "",
              checks: bool = True, json: bool = False, yes: bool = False, board: str | None = None,
              account_password: str = "words",  # noqa: S107 - a mode, not a password
              ssh_via: str = "", agent_via: str = "") -> None:
    """Set Clef up on the device over SSH (seed, accounts, rules, agent), then check it."""
    import sys
    from pathlib import Path

    from clef_armory.errors import ProvisionError
    from provision import commands, report
    from provision.secrets import Passwords

    settings = _settings_for_build(c, board, not known_hosts, chain_id=chain_id)
    inputs = commands.ProvisionInputs(
        accounts=accounts, import_keystore=Path(import_keystore) if import_keystore else None,
        rules_file=Path(rules) if rules else None, policy_file=Path(policy) if policy else None,
        chain_id=settings.chain_id, run_checks=checks, account_password=account_password,
        sample_check=None if json or not policy else _sample_check(settings),
        confirm=None if yes or json or not sys.stdin.isatty()
        else lambda q: input(f"{q} [y/N] ").strip().lower() in ("y", "yes"))
    passwords = Passwords(Path(password_file) if password_file else None)
    session = commands.session_for(settings, host, port, user, identity, known_hosts, ssh_via, agent_via)
    steps, results = commands.provision(session, passwords, inputs, say=(lambda _: None) if json else print)
    print(report.as_json(steps, results) if json else report.steps_table(steps))
    if results and not json:
        print(report.checks_table(results))
    if commands.failed(results):
        raise ProvisionError(f"{len(commands.failed(results))} key-handling check(s) failed")


def _sample_check(settings: Any) -> Any:
    """provision's table of built-in samples under the policy, run in the laptop's own Clef."""
    from provision import policycheck

    return lambda pol, name: policycheck.sample_table(policycheck.host_clef(settings), pol, name)


@task(
    auto_shortflags=False,
    positional=["action", "file"],
    help={
        **{k: v for k, v in _SSH_HELP.items() if k not in ("json", "ssh_via", "agent_via")},
        "action": "check: run the policy's rules in a throw-away Clef here; reset-windows: empty the "
                  "device's spending windows (asks for the master password).",
        "file": "check: the policy YAML.",
        "tx": "check: a JSON transaction (eth_signTransaction form) or a list of them, in order; an item "
              "may carry \"at\": \"2h\" (device time when it is asked).",
        "typed_data": "check: a JSON EIP-712 object.",
        "message": "check: a text message (personal_sign).",
        "at": "check: device time (e.g. 25h) for samples without their own \"at\".",
        "qube": "check: ask as this qube (the agent's User-Agent 'clef-armory-agent qube=NAME').",
        "chain_id": "check: the device's chain id (Clef --chainid; also the policy's default chain).",
    },
)
@user_errors
def policy(c: Context, action: str, file: str | None = None, tx: str = "", typed_data: str = "",
           message: str | None = None, at: str = "", qube: str = "", chain_id: int | None = None,
           host: str = "10.0.0.1", port: int = 22,
           user: str = "armory", identity: str = "", known_hosts: str = "", password_file: str = "",
           board: str | None = None) -> None:
    """Check a policy before it goes on the device, or reset the device's spending windows."""
    from pathlib import Path

    from clef_armory.errors import ConfigError
    from provision import commands, policycheck
    from provision import policy as policy_mod
    from provision.secrets import Passwords

    if action == "check":
        if not file:
            raise ConfigError("give the policy file: ./do policy check policy.yaml")
        settings = settings_from(c, **({"chain_id": chain_id} if chain_id else {}))
        pol = policy_mod.load(Path(file), settings.chain_id)
        samples = policycheck.load_samples(Path(tx) if tx else None, Path(typed_data) if typed_data else None,
                                           message)
        print("\n".join(policy_mod.describe(pol)))
        # With --chain-id the throw-away Clef runs on the chain provisioning would give the device's
        # (settings.chain_id: the flag as a checked int; invoke hands an untyped default over as text).
        chain = settings.chain_id if chain_id else None
        verdicts = policycheck.check(policycheck.host_clef(settings), pol, Path(file).name,
                                     samples or policycheck.builtin_samples(pol, chain),
                                     policycheck.parse_time(at) if at else None,
                                     f"clef-armory-agent qube={qube}" if qube else None, chain)
        print(policycheck.table(verdicts))
    elif action == "reset-windows":
        session = _session(c, board, host, port, user, identity, known_hosts)
        result = commands.reset_windows(session, Passwords(Path(password_file) if password_file else None))
        print("spending windows emptied" if result["changed"] else "spending windows were already empty")
    else:
        raise ConfigError(f"unknown policy action {action!r}: use check or reset-windows")


@task(auto_shortflags=False, help={**_SSH_HELP})
@user_errors
def unlock(c: Context, host: str = DEVICE_ADDRESS, port: int = SSH_PORT, user: str = "armory",
           identity: str = "",
           known_hosts: str = "", password_file: str = "", json: bool = False,
           board: str | None = None, ssh_via: str = "", agent_via: str = "") -> None:
    """Give the agent the master password after a boot and wait until it is ready."""
    import json as jsonlib
    from pathlib import Path

    from provision import commands
    from provision.secrets import Passwords

    session = _session(c, board, host, port, user, identity, known_hosts, ssh_via, agent_via)
    health = commands.unlock(session, Passwords(Path(password_file) if password_file else None))
    print(jsonlib.dumps(health) if json else f"agent {health.get('state')} (Clef {health.get('clef')})")


@task(auto_shortflags=False,
      help={**_SSH_HELP, "search_passwords": "Ask for the passwords and search the device for them."})
@user_errors
def check(c: Context, host: str = DEVICE_ADDRESS, port: int = SSH_PORT, user: str = "armory",
          identity: str = "",
          known_hosts: str = "", password_file: str = "", search_passwords: bool = True,
          json: bool = False, board: str | None = None, ssh_via: str = "", agent_via: str = "") -> None:
    """Run the key-handling checks alone; non-zero exit if any fails."""
    from pathlib import Path

    from clef_armory.errors import ProvisionError
    from provision import commands, report
    from provision.secrets import Passwords

    session = _session(c, board, host, port, user, identity, known_hosts, ssh_via, agent_via)
    passwords = Passwords(Path(password_file) if password_file else None) if search_passwords else None
    results = commands.check(session, passwords)
    print(report.as_json(results=results) if json else report.checks_table(results))
    if commands.failed(results):
        raise ProvisionError(f"{len(commands.failed(results))} key-handling check(s) failed")


@task(auto_shortflags=False,
      help={**{k: v for k, v in _SSH_HELP.items()
               if k not in ("password_file", "json", "ssh_via", "agent_via")},
            "known_hosts": "known_hosts pinning the device's host key: the one of the image you flashed "
                           "(an update keeps the device's key; default: build/<board>/known_hosts).",
            "image": "New image (.img or its build directory); default: build/<board>/.",
            "rollback": "Boot the other slot again (the system before the last update)."})
@user_errors
def update(c: Context, host: str = DEVICE_ADDRESS, port: int = SSH_PORT, user: str = "armory",
           identity: str = "", known_hosts: str = "", image: str = "", rollback: bool = False,
           board: str | None = None) -> None:
    """Update the device's system in its inactive slot over SSH; keys and data stay (docs/updating.md)."""
    from pathlib import Path

    from provision import update as updating

    settings = _settings_for_build(c, board, not known_hosts)
    session = _session(c, board, host, port, user, identity, known_hosts)
    new = None
    if not rollback:
        new = updating.load_system(Path(image) if image else settings.output_dir / settings.board)
    report = updating.update(session, new)
    for line in report.lines():
        print(line)
    print("unlock it with ./do unlock, then ./do check")


@task(auto_shortflags=False, help={k: v for k, v in _SSH_HELP.items() if k != "password_file"})
@user_errors
def status(c: Context, host: str = DEVICE_ADDRESS, port: int = SSH_PORT, user: str = "armory",
           identity: str = "",
           known_hosts: str = "", json: bool = False, board: str | None = None, ssh_via: str = "",
           agent_via: str = "") -> None:
    """Show what is set up on the device and whether the agent is ready."""
    import json as jsonlib

    from provision import commands, report

    session = _session(c, board, host, port, user, identity, known_hosts, ssh_via, agent_via)
    st = commands.status(session)
    print(jsonlib.dumps(st, indent=2) if json else report.status_text(st))


@task(
    auto_shortflags=False,
    help={
        "image": "Image to boot (default: the one in build/qemu/).",
        "memory": "Guest RAM in MiB (default 512, the USB armory Mk II's).",
        "cpus": "Emulated CPUs (default 2; the Mk II has 1, more only speeds up emulation).",
        "timeout": "Seconds to wait for sshd to answer before giving up (default 900).",
        "state": "qcow2 file keeping the device's disk between runs (created on first use); "
                 "default: a throwaway overlay. The built image is never modified.",
        "hold": "Keep the guest running until Ctrl-C (default on; --no-hold stops it once sshd answers).",
        "link": "tap: a real link, interface --tap at 10.0.0.2/24 with the device at 10.0.0.1 (needs root); "
                "user: QEMU's user-mode network on loopback ports (no root; use --ssh-via/--agent-via).",
        "tap": "Name of the laptop-side interface for --link tap (default armory0).",
    }
)
@user_errors
def run_qemu(c: Context, image: str = "", memory: int = 512, cpus: int = 2, timeout: float = 900.0,
             state: str = "", hold: bool = True, link: str = "tap", tap: str = "armory0") -> None:
    """Boot the qemu board's image via its U-Boot: a stand-in device at 10.0.0.1 on a tap (or loopback)."""
    import contextlib
    from pathlib import Path

    from clef_armory.errors import ConfigError
    from provision import qemu
    from provision import tap as taps

    if link not in ("tap", "user"):
        raise ConfigError(f"--link {link!r}: use tap (a real link, needs root) or user (loopback ports)")
    settings = settings_from(c)
    found = qemu.find_image(settings, Path(image) if image else None)  # a wrong image: before any interface
    with taps.signals_as_interrupt(), contextlib.ExitStack() as stack:
        made = stack.enter_context(taps.tap_link(tap)) if link == "tap" else None
        guest = qemu.QemuGuest(found, memory_mib=memory, cpus=cpus, boot_timeout=timeout,
                               state=Path(state) if state else None, tap=made.name if made else None,
                               log=lambda line: print(line, flush=True))
        if made:
            print(f"link:  {made.name} {made.address} (this machine) <-> {DEVICE_ADDRESS} (the guest); "
                  "removed when the guest stops", flush=True)
        with guest:
            if made:
                print(f"ssh:   {DEVICE_ADDRESS}:{SSH_PORT} (pinned key: {found.known_hosts})")
                print(f"agent: http://{DEVICE_ADDRESS}:{AGENT_PORT}  "
                      f"e.g. ./do provision --host {DEVICE_ADDRESS} --policy POLICY.yaml")
            else:
                print(f"ssh:   127.0.0.1:{guest.ssh_port} -> {DEVICE_ADDRESS}:{SSH_PORT}  "
                      f"(pinned key: {found.known_hosts})")
                print(f"agent: 127.0.0.1:{guest.agent_port} -> {DEVICE_ADDRESS}:{AGENT_PORT}")
                print(f"use:   ./do provision --ssh-via 127.0.0.1:{guest.ssh_port} "
                      f"--agent-via 127.0.0.1:{guest.agent_port} --board qemu ...")
            print(f"console log: {guest.console_log}")
            if hold:
                print("running; Ctrl-C powers the guest off", flush=True)
                qemu.hold(guest)
            print("powering off ...", flush=True)
    print("guest stopped")


@task(
    auto_shortflags=False,
    help={
        "armory_qube": "The qube the armory is attached to (qvm-usb).",
        "dapp_qubes": "Comma-separated qubes that may sign through it, e.g. work,defi.",
        "dapp_tag": "Instead of --dapp-qubes: every qube with this Qubes tag.",
        "ask": "Ask in dom0 before every call instead of allowing it.",
        "output": "Directory for 30-clef-armory.policy (default: build/qubes/dom0).",
    },
)
@user_errors
def qubes_policy(c: Context, armory_qube: str = "", dapp_qubes: str = "", dapp_tag: str = "",
                 ask: bool = False, output: str = "build/qubes/dom0") -> None:
    """Write dom0's qrexec policy for clefarmory.Sign (checked by our linter; see docs/qubes.md)."""
    from pathlib import Path

    from qubes import QubesError, policy

    if not armory_qube:
        raise QubesError("--armory-qube NAME is required")
    names = [q.strip() for q in dapp_qubes.split(",") if q.strip()]
    path = policy.write(Path(output), policy.render(armory_qube, names, dapp_tag, ask))
    print(f"{path} (copy into dom0's /etc/qubes/policy.d/, see docs/qubes.md)")


@task(auto_shortflags=False, help={"output": "Output directory (default: build/qubes)."})
@user_errors
def qubes_files(c: Context, output: str = "build/qubes") -> None:
    """Render the files for the armory qube and the dapp qubes (see docs/qubes.md)."""
    from pathlib import Path

    from qubes.files import QubesConfig, write_all

    for path in write_all(QubesConfig(), Path(output)):
        print(path)


@task(
    auto_shortflags=False,
    help={
        "rpc": "The node's JSON-RPC URL for reads and broadcasts, e.g. http://127.0.0.1:8545 (required).",
        "listen": "HOST:PORT to serve on (default: invoke.yaml, 127.0.0.1:8552; loopback unless --public).",
        "armory": "The armory's agent (default: invoke.yaml, http://10.0.0.1:8550).",
        "public": "Allow a --listen address other machines can reach (anyone there can ask for signatures).",
    },
)
@user_errors
def wallet(c: Context, rpc: str = "", listen: str | None = None, armory: str | None = None,
           public: bool = False) -> None:
    """Serve a wallet endpoint on the laptop: fills, has the armory sign, broadcasts (docs/clients.md)."""
    from clef_armory.config import wallet_from_mapping
    from wallet import server

    section = c.config.get("wallet", {})
    settings = wallet_from_mapping({**(dict(section) if section else {}), **{
        k: v for k, v in {"rpc": rpc or None, "listen": listen, "armory": armory,
                          "public": True if public else None}.items() if v is not None}})
    server.run(settings, say=lambda text: print(text, flush=True))
