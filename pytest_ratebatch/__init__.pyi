from types import ModuleType

from .api import *  # noqa: F403
from .api import __all__ as __all__

__version__: str

def import_compiled(name: str) -> ModuleType: ...
