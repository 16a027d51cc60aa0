"""The commands of ``rmexport``, one module each, imported only when that command is named.

Each module has ``add_options(parser)``, which declares the command's arguments from the fields of its
configuration (``rmexport.config``, ``PruneOptions``; see ``rmexport.options``), and ``run(args) -> int``,
which reads the configuration back, checks it (``rmexport.inputs``) and calls the Python API
(``rmexport.api``) or the stage it names. ``rmexport.cli`` chooses the module, so that ``rmexport --help``
and ``rmexport <command> --help`` import only what they show.
"""

__all__: list[str] = []
