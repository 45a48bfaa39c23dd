from .api import *  # noqa: F403
from .api import __all__ as __all__

__version__: str

from types import ModuleType

def import_compiled(name: str) -> ModuleType: ...
