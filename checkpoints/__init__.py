"""Released learned-optimizer artifacts, installed as the package ``metaopt_checkpoints``.

Each artifact is a folder ``<name>/`` (orbax arrays + JSON metadata); every file below
this folder ships in the wheel as package data. Locate the folder with
``metaopt._resources.checkpoints_dir()``, never with a path relative to the repository.
"""
