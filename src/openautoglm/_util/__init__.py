"""Helpers that import nothing else from openautoglm: argument checks (:mod:`.checks`), finite guards
(:mod:`.finite`), atomic writes (:mod:`.atomic`)."""
