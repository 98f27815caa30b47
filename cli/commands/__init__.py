"""One module per ``setpoint`` verb: ``add_arguments(parser)`` and ``run(args) -> int``.

Verb modules import only the standard library at module level; a side's code is
imported inside ``run``.
"""
