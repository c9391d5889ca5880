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
        def find_spec(self, name, path, target=None):
            if name != registry:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            exec_module = spec.loader.exec_module

            def exec_then_register(module):
                exec_module(module)
                import lowbit.hf  # noqa: F401

            spec.loader.exec_module = exec_then_register
            return spec

    sys.meta_path.insert(0, _AfterRegistryImport())
