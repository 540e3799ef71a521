"""The agent's own small error family (it runs on the device and imports no laptop code)."""


class AgentError(Exception):
    """Base class: the message is one line meant for a person."""


class ConfigError(AgentError):
    """The agent config file is missing, malformed or has a bad value."""


class ControlError(AgentError):
    """A control-socket command failed (locked, wrong password, agent not running)."""


class StartError(AgentError):
    """`serve` cannot start: the audit log, the control socket or the listening port is unusable."""
