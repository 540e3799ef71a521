"""The USB link's fixed facts, in one place for both ends (docs/design.md).

The device's agent defaults, the image's templates, provisioning, the tasks' flags and the QEMU
stand-in all take these from here (standard library only: this module runs on the device too).
"""

INTERFACE = "usb0"  # the gadget's network interface on the device (renamed NIC on the qemu board)
DEVICE_ADDRESS = "10.0.0.1"  # the device's address on the link: sshd and the agent listen here
HOST_ADDRESS = "10.0.0.2"  # the laptop's address, the only one the device's DHCP server leases
PREFIX = 24
DEVICE_MAC = "1a:55:89:a2:69:41"  # fixed, so the laptop's network manager sees the same device each time
HOST_MAC = "1a:55:89:a2:69:42"
AGENT_PORT = 8550  # the agent's public port (Clef's HTTP API, behind the policy)
CLEF_HTTP_PORT = 8551  # Clef's own HTTP port, on 127.0.0.1 only; never AGENT_PORT
SSH_PORT = 22
