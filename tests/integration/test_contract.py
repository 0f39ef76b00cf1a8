"""Run the contract suite (msgkit.testing.contract) as part of the repo's own test run.

Every ``test_*`` function of every ``msgkit.testing.contract.test_*`` module is re-exported here,
so new contract modules are picked up without editing this file. The msgkit pytest plugin
parametrizes them over ``memory://`` and each ``MSGKIT_<BROKER>_URL`` in the environment whose
scheme has a registered transport (test ids: ``[memory]``, ``[amqp]``, ...).
"""

from __future__ import annotations

import importlib
import pkgutil

import msgkit.testing.contract as contract


def _reexport_contract_tests() -> None:
    for info in pkgutil.iter_modules(contract.__path__):
        if not info.name.startswith("test_"):
            continue
        module = importlib.import_module(f"{contract.__name__}.{info.name}")
        for name, test in vars(module).items():
            if name.startswith("test_") and callable(test):
                if name in globals():
                    raise RuntimeError(f"contract test {name} is defined in two modules; rename one")
                globals()[name] = test


_reexport_contract_tests()
