"""Budget-driven compression: pick the recipe that fits a memory budget with the least quality loss.

>>> from openautoglm.auto import compress_to_budget                                 # doctest: +SKIP
>>> result = compress_to_budget(model, "12GiB", context=16384, batch=4)             # doctest: +SKIP
>>> result.write_report("out/report")                                               # doctest: +SKIP
>>> model.save_pretrained("out/model")   # config.json records the recipe          # doctest: +SKIP

Importing this package registers the loader's rebuilders for the ``kv_cache`` and ``recipe`` records.
"""

from .api import compress_to_budget
from .budget import BudgetError, free_gpu_memory, parse_budget
from .recipe import apply_recipe, kv_config_of, load_recipe, recorded_kv_config, save_recipe, validate_recipe
from .result import AutoResult

__all__ = ["AutoResult", "BudgetError", "apply_recipe", "compress_to_budget", "free_gpu_memory", "kv_config_of",
           "load_recipe", "parse_budget", "recorded_kv_config", "save_recipe", "validate_recipe"]
