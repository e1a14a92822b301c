"""The learned optimizer's optional features (switches), one module each.

Each module declares its switch (:class:`metaopt.lopt._switches._base.Switch`): config
fields, state fields, features, candidates, theta entries and the hooks the core calls.
:data:`SWITCHES` registers them, in the order their features and candidates are
appended (so the rows of an LO without a later switch keep their places).
"""

from metaopt.lopt._switches import muon
from metaopt.lopt._switches import step_size
from metaopt.lopt._switches._base import ConfigField
from metaopt.lopt._switches._base import InitContext
from metaopt.lopt._switches._base import Switch
from metaopt.lopt._switches._base import SwitchStep

SWITCHES = (
    muon.SWITCH,
    step_size.SWITCH,
)

__all__ = ["ConfigField", "InitContext", "SWITCHES", "Switch", "SwitchStep"]
