"""The ``localify`` command line (installed as :mod:`localify.cli`; the console script runs :func:`main`).

Commands: ``convert``, ``inspect``, ``verify``, ``bench``; see ``localify --help``. Every command is a thin
layer over the public library API (:func:`localify.create_model`, :func:`localify.find_mlps`,
:func:`localify.localify`, :func:`localify.save`, :func:`localify.load`).
"""

from .app import app, main

__all__ = ["app", "main"]
