"""Registers lowbit with Transformers without importing Transformers on ``import lowbit``."""

from __future__ import annotations


def register_with_transformers() -> None:
    """Make ``quant_method="lowbit"`` known to Transformers (``lowbit.hf``) on ``import lowbit``.

    Importing Transformers' quantizer registry takes seconds, so ``import lowbit``
    does not do it: ``lowbit.hf`` is imported now if the registry already is, else
    right after the registry's own import (``from_pretrained`` triggers it).
    """
    import importlib.abc
    import importlib.util
    import sys

    registry = "transformers.quantizers"
    if registry in sys.modules:
        import lowbit.hf  # noqa: F401

        return
    if importlib.util.find_spec("transformers") is None:
        return

    class _AfterRegistryImport(importlib.abc.MetaPathFinder):
        """Hands out the registry's real spec with ``lowbit.hf`` imported after the module
        runs. It stays on ``sys.meta_path`` until that happens: a bare ``find_spec`` probe of
        the registry (which executes nothing) must not use it up."""

        busy = False

        def find_spec(self, name, path, target=None):
            if name != registry or self.busy:
                return None
            self.busy = True  # the lookup below asks every finder again, this one included
            try:
                spec = importlib.util.find_spec(name)
            finally:
                self.busy = False
            if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
                return None
            exec_module = spec.loader.exec_module

            def exec_then_register(module):
                exec_module(module)
                if self in sys.meta_path:
                    sys.meta_path.remove(self)
                import lowbit.hf  # noqa: F401

            spec.loader.exec_module = exec_then_register
            return spec

    sys.meta_path.insert(0, _AfterRegistryImport())
